"""Compile through a content-addressed object cache shared by every build on this machine.

Run as a script by the build's ninja file (so that it starts without importing torch)::

    python objcache.py CACHE_DIR KEY OUTPUT -- nvcc ...

``KEY`` hashes what is compiled (rendered source, full command, toolchain, runtime headers), so a hit is
the object nvcc would produce; a miss compiles and stores the result atomically.
"""
import os
import shutil
import subprocess
import sys


def main(argv: list[str]) -> int:
    cache_dir, key, output, sep, *command = argv[1:]
    if sep != "--" or not command:
        sys.stderr.write("usage: objcache.py CACHE_DIR KEY OUTPUT -- COMMAND...\n")
        return 2
    cached = os.path.join(cache_dir, key + ".o")
    if os.path.isfile(cached):
        shutil.copyfile(cached, output)
        return 0
    status = subprocess.call(command)
    if status == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        shutil.copyfile(output, tmp)
        os.replace(tmp, cached)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
