"""The C ABI as Python sees it, against runtime/apex4gen.h: the enum table (apex4gen.abi) and its C++ spellings
(apex4gen.kernels.cpp_names), the ctypes signatures and argument struct of the loader."""
from __future__ import annotations

import ast
import ctypes
import re
import sys
from pathlib import Path

import pytest

import apex4gen
from apex4gen import abi
from apex4gen.kernels import cpp_names
from apex4gen.paths import runtime_dir

HEADER = (runtime_dir() / "apex4gen.h").read_text()
_CODE = re.sub(r"//[^\n]*", "", HEADER)


def header_enums() -> dict[str, dict[str, int]]:
    """``typedef enum { A = 0, B = 1 } name;`` blocks of the header: name -> {A: 0, B: 1}."""
    enums = {}
    for body, name in re.findall(r"typedef\s+enum\s*\{(.*?)\}\s*(\w+)\s*;", _CODE, re.S):
        entries = [e.split("=") for e in body.replace("\n", " ").split(",") if e.strip()]
        enums[name] = {k.strip(): int(v) for k, v in entries}
    return enums


# the header's typedef name of each table in apex4gen.abi
ENUMS = {"apex4gen_dtype": abi.DTYPE, "apex4gen_act_format": abi.ACT_FORMAT, "apex4gen_status": abi.STATUS,
         "apex4gen_weight_layout": abi.WEIGHT_LAYOUT}
# the C++ spellings of each enum's apex4gen names; the status codes are spelt APEX4GEN_<NAME>
SPELLINGS = {"apex4gen_dtype": cpp_names.DTYPE_ENUM, "apex4gen_act_format": cpp_names.ACT_FORMAT_ENUM,
             "apex4gen_status": {name: f"APEX4GEN_{name.upper()}" for name in abi.STATUS},
             "apex4gen_weight_layout": cpp_names.WEIGHT_LAYOUT_ENUM}


def test_the_header_has_exactly_the_enums_of_the_table():
    assert set(header_enums()) == set(ENUMS)


@pytest.mark.parametrize("c_type", sorted(ENUMS))
def test_enum_values_match_the_header(c_type):
    table, spelling = ENUMS[c_type], SPELLINGS[c_type]
    assert set(spelling) == set(table)  # every name has one spelling, and nothing else is spelt
    assert {spelling[name]: value for name, value in table.items()} == header_enums()[c_type]


def header_functions() -> dict[str, str]:
    """The entries X(return type, name, (parameters)) of APEX4GEN_FUNCTIONS: apex4gen_<name> -> parameters."""
    block = re.search(r"#define APEX4GEN_FUNCTIONS\(X\)(.*?)\n\s*\n", _CODE, re.S).group(1).replace("\\\n", " ")
    return {f"apex4gen_{name}": params.strip()
            for name, params in re.findall(r"X\([^,()]+,\s*(\w+),\s*\((.*?)\)\)", block, re.S)}


def test_every_exported_function_has_a_ctypes_signature():
    from apex4gen.loader.binding import SIGNATURES
    functions = header_functions()
    assert len(functions) > 10 and list(functions) == list(SIGNATURES)  # the order of apex4gen_api's fields
    for name, (_, argtypes) in SIGNATURES.items():
        params = functions[name]
        count = 0 if params in ("", "void") else params.count(",") + 1
        assert len(argtypes) == count, name


# ctypes types of the header's scalar parameter types; every other scalar (int, the enums) travels as int
SCALAR_CTYPES = {"float": ctypes.c_float, "size_t": ctypes.c_size_t, "cudaStream_t": ctypes.c_void_p}


def _is_pointer(argtype) -> bool:
    return argtype is ctypes.c_void_p or argtype is ctypes.c_char_p or issubclass(argtype, ctypes._Pointer)


def test_every_parameter_has_its_ctypes_type():
    """A float passed as int (or a pointer as int) is garbage on the C side with no error: each parameter's ctypes
    type follows its C type."""
    from apex4gen.loader.binding import SIGNATURES
    for name, params in header_functions().items():
        if params in ("", "void"):
            continue
        for param, argtype in zip(params.split(","), SIGNATURES[name][1]):
            c_type = param.strip().rsplit(None, 1)[0]
            if "*" in param:
                assert _is_pointer(argtype), (name, param)
            else:
                assert argtype is SCALAR_CTYPES.get(c_type, ctypes.c_int), (name, param)


def test_gemm_args_mirror_the_header_struct():
    from apex4gen.loader.binding import GemmArgs
    body = re.search(r"typedef\s+struct\s*\{(.*?)\}\s*apex4gen_gemm_args\s*;", _CODE, re.S).group(1)
    fields = [name for decl in body.split(";") if decl.strip()
              for name in re.findall(r"\*?\s*(\w+)\s*(?:,|$)", decl.strip())]
    assert [f[0] for f in GemmArgs._fields_] == fields


@pytest.mark.parametrize("module", ["abi", "manifest", "objcache"])
def test_shared_modules_import_only_the_standard_library(module):
    """The build and the runtime share these; objcache.py also runs as a script before anything is imported."""
    tree = ast.parse((Path(apex4gen.__file__).parent / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [] if node.level else [node.module]
            if node.level:  # within apex4gen: only the stdlib-only error and file helpers
                assert node.module in ("errors", "files"), f"{module} imports .{node.module}"
        else:
            continue
        for name in names:
            assert name.split(".")[0] in sys.stdlib_module_names or name == "__future__", f"{module} imports {name}"
