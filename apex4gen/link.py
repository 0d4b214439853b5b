"""Link a build's objects into its libraries, every exported name carrying the build's prefix.

Run as a script by the build's ninja file (it imports nothing of apex4gen)::

    python link.py --prefix P --soname libapex4gen_P.so.1 --shared lib/libapex4gen_P.so.V \\
        --static lib/libapex4gen_P.a --work obj/P -- NVCC -- OBJECT...

The objects become one relocatable object (``ld -r``; section groups resolved, so that weak template code
shared by the kernels is settled inside the build). Its default-visibility ``apex4gen_<name>`` symbols are
renamed ``apex4gen_<prefix>_<name>`` and every other symbol is made local (``objcopy``), so that the static
library, like the shared one, shows nothing but the prefixed ABI: two builds link into one program without a
clash, even when they share kernels. The shared library is linked from that object with its SONAME, beside
the ``.so.<ABI>`` and ``.so`` links.
"""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install binutils (the host toolchain nvcc uses)")
    return found


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{Path(command[0]).name} failed linking the build ({' '.join(command[:3])} ...)")
    return done.stdout


def defined_symbols(obj: Path, binding: str, visibility: str | None = None) -> list[str]:
    """Names of the symbols of one binding (GLOBAL, UNIQUE), and visibility if given, the object defines
    (readelf -Ws columns: Num Value Size Type Bind Vis Ndx Name)."""
    names = []
    for line in run([tool("readelf"), "-Ws", "--wide", str(obj)]).splitlines():
        fields = line.split()
        if len(fields) == 8 and fields[4] == binding and fields[6] != "UND" and visibility in (None, fields[5]):
            names.append(fields[7])
    return names


def prefixed_names(names: list[str], prefix: str) -> dict[str, str]:
    foreign = [n for n in names if not n.startswith("apex4gen_")]
    if foreign:
        raise SystemExit(f"the build exports {', '.join(foreign[:3])}, outside the apex4gen_ names: give it "
                         "hidden visibility (APEX4GEN_EXPORT marks only the ABI)")
    return {n: f"apex4gen_{prefix}_{n[len('apex4gen_'):]}" for n in names}


def prefixed_object(objects: list[str], prefix: str, work: Path) -> Path:
    combined, final = work.with_suffix(".combined.o"), work.with_suffix(".o")
    run([tool("ld"), "-r", "--force-group-allocation", "-o", str(combined), *objects])
    abi = prefixed_names(defined_symbols(combined, "GLOBAL", "DEFAULT"), prefix)
    renames, unique, keep = (work.with_suffix(suffix) for suffix in (".renames", ".unique", ".globals"))
    renames.write_text("".join(f"{old} {new}\n" for old, new in abi.items()))
    # C++ inline variables (GNU unique binding) cannot be made local; weak ones can
    unique.write_text("".join(f"{n}\n" for n in defined_symbols(combined, "UNIQUE")))
    run([tool("objcopy"), f"--redefine-syms={renames}", f"--weaken-symbols={unique}", str(combined), str(final)])
    # only the ABI stays global: hidden symbols become local, and so do the weak ones (template code and inline
    # variables of the C++ libraries) that two builds would both define
    keep.write_text("".join(f"{n}\n" for n in abi.values()))
    run([tool("objcopy"), f"--keep-global-symbols={keep}", str(final)])
    combined.unlink()
    return final


def link_libraries(obj: Path, soname: str, shared: Path, static: Path, nvcc_link: list[str]) -> None:
    static.unlink(missing_ok=True)
    run([tool("ar"), "rcs", str(static), str(obj)])
    # no device link (the kernels are whole-program objects): it would only add nvlink's record of the
    # toolkit's paths; the CUDA runtime is the shared one, as the CMake package's CUDA::cudart
    run([*nvcc_link, "-shared", "-nodlink", "--cudart", "shared", str(obj), "-o", str(shared),
         f"-Xlinker=-soname={soname}"])
    development = soname[:soname.index(".so") + len(".so")]  # libapex4gen_P.so, what -l and dlopen name
    symlink(shared.parent / soname, shared.name)
    symlink(shared.parent / development, soname)


def symlink(path: Path, target: str) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    os.symlink(target, path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="link.py")
    for name in ("--prefix", "--soname", "--shared", "--static", "--work"):
        parser.add_argument(name, required=True)
    args, rest = parser.parse_known_args(argv[1:])
    if rest.count("--") != 2 or rest[0] != "--":
        parser.error("expected -- NVCC -- OBJECTS...")
    split = rest.index("--", 1)
    nvcc_link, objects = rest[1:split], rest[split + 1:]
    obj = prefixed_object(objects, args.prefix, Path(args.work))
    link_libraries(obj, args.soname, Path(args.shared), Path(args.static), nvcc_link)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
