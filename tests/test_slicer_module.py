"""The 3D Slicer module (slicer_extension/) checked without Slicer, for what can be checked honestly here.

3D Slicer cannot run on this machine (no package exists for it), so nothing here imports the module or
fakes Slicer: the files are compiled and read. The layout: LowDoseDenoise.py holds Slicer's four classes;
the widget and the logic take their sections and views as mixins from LowDoseDenoiseSlicer/; what needs no
Slicer is in LowDoseDenoiseLib/. Checked: every file compiles, also for the Python of Slicer 5 (3.9); every
widget the code uses (``self.ui.<name>``) exists in the Qt Designer file, which is well formed; every slot,
logic method and attribute the widget, its sections and the logic use exists; every name taken from the
module's packages exists there; the layers import one way; no function is longer than 80 lines; the CMake
lists name exactly the module's .py/.ui/.png files; the extension's CMakeLists has what Slicer's extension
build needs; the icon is a real PNG; LowDoseDenoiseLib imports nothing from Slicer, Qt or VTK (standard
library only); and the library's own unit tests (Testing/Python/LowDoseDenoiseLibTest.py, also registered
to run inside Slicer) pass. What is left (the widget in a running Slicer) is the module's self-test
LowDoseDenoiseTest.
"""

from __future__ import annotations

import ast
import py_compile
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

EXTENSION = Path(__file__).resolve().parent.parent / "slicer_extension"
MODULE = EXTENSION / "LowDoseDenoise"
MODULE_FILE = MODULE / "LowDoseDenoise.py"
UI_FILE = MODULE / "Resources" / "UI" / "LowDoseDenoise.ui"
ICON = MODULE / "Resources" / "Icons" / "LowDoseDenoise.png"
LIB = MODULE / "LowDoseDenoiseLib"
SLICER_SIDE = MODULE / "LowDoseDenoiseSlicer"  # the widget's sections and the logic's views (need Slicer)
SLICER_PYTHON = (3, 9)  # Slicer 5.0-5.6 ship Python 3.9; later ones newer
MAX_FUNCTION_LINES = 80
MAX_MODULE_FILE_LINES = 500  # the module file stays thin: Slicer's four classes, the rest in the packages


def _module_files(*suffixes: str) -> set[Path]:
    return {p for p in MODULE.rglob("*") if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _class(tree: ast.Module, name: str, path: Path = MODULE_FILE) -> ast.ClassDef:
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    assert found, f"class {name} missing from {path.name}"
    return found[0]


def _methods(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def _source_of(module: str) -> Path:
    """The file of a module of the module's packages (``LowDoseDenoiseSlicer.views`` -> .../views.py)."""
    path = MODULE / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _parts(name: str) -> list[ast.ClassDef]:
    """A class of the module file and the mixins it takes from LowDoseDenoiseSlicer (its bases imported there)."""
    tree = _tree(MODULE_FILE)
    cls = _class(tree, name)
    imported = {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("LowDoseDenoiseSlicer")
        for alias in node.names
    }
    mixins = [
        _class(_tree(_source_of(imported[b.id])), b.id, _source_of(imported[b.id]))
        for b in cls.bases
        if isinstance(b, ast.Name) and b.id in imported
    ]
    return [cls, *mixins]


def _assigned(parts: list[ast.ClassDef]) -> set[str]:
    """The attributes ``self.<name> = ...`` (also in tuples) that the classes set."""
    names = set()
    for part in parts:
        for node in ast.walk(part):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, (ast.AugAssign, ast.AnnAssign))
                else []
            )
            for target in targets:
                for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(element, ast.Attribute) and _is_self_attr(element, element.attr):
                        names.add(element.attr)
    return names


def _is_self_call(node) -> bool:
    """node is a call ``self.<name>(...)``."""
    func = node.func if isinstance(node, ast.Call) else None
    return isinstance(func, ast.Attribute) and _is_self_attr(func, func.attr)


def _slicer_side_files() -> list[Path]:
    """The files that need Slicer: the module file and LowDoseDenoiseSlicer."""
    return [MODULE_FILE, *sorted(SLICER_SIDE.glob("*.py"))]


def _is_self_attr(node, *chain: str) -> bool:
    """node is self.<chain[0]>.<chain[1]>... (the last attribute first in the AST)."""
    for name in reversed(chain):
        if not (isinstance(node, ast.Attribute) and node.attr == name):
            return False
        node = node.value
    return isinstance(node, ast.Name) and node.id == "self"


# ----------------------------------------------------------------------------------------- python files


@pytest.mark.parametrize("path", sorted(_module_files(".py")), ids=lambda p: str(p.relative_to(MODULE)))
def test_every_python_file_compiles_also_for_slicers_python(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)
    ast.parse(path.read_text(encoding="utf-8"), feature_version=SLICER_PYTHON)


def test_the_module_has_the_four_classes_slicer_expects():
    tree = _tree(MODULE_FILE)
    bases = {
        "LowDoseDenoise": "ScriptedLoadableModule",
        "LowDoseDenoiseWidget": "ScriptedLoadableModuleWidget",
        "LowDoseDenoiseLogic": "ScriptedLoadableModuleLogic",
        "LowDoseDenoiseTest": "ScriptedLoadableModuleTest",
    }
    for name, base in bases.items():
        cls = _class(tree, name)
        assert base in {b.id for b in cls.bases if isinstance(b, ast.Name)}, f"{name} does not derive from {base}"
    assert {"setUp", "runTest"} <= _methods(_class(tree, "LowDoseDenoiseTest"))
    assert {"setup", "cleanup"} <= _methods(_class(tree, "LowDoseDenoiseWidget"))


def test_every_file_of_lowdosedenoiseslicer_is_mixed_into_the_widget_or_the_logic():
    """The sections and views are parts of the widget and the logic, not loose code."""
    mixed = {part.name for name in ("LowDoseDenoiseWidget", "LowDoseDenoiseLogic") for part in _parts(name)[1:]}
    for path in sorted(SLICER_SIDE.glob("*.py")):
        if path.name != "__init__.py":
            classes = {n.name for n in _tree(path).body if isinstance(n, ast.ClassDef)}
            assert classes and classes <= mixed, f"{path.name}: {sorted(classes - mixed)} mixed into neither"
    assert len(_parts("LowDoseDenoiseWidget")) > 1 and len(_parts("LowDoseDenoiseLogic")) > 1


def test_the_module_file_is_thin_and_no_function_is_longer_than_80_lines():
    lines = len(MODULE_FILE.read_text(encoding="utf-8").splitlines())
    assert lines < MAX_MODULE_FILE_LINES, f"{MODULE_FILE.name} has {lines} lines"
    for path in sorted(_module_files(".py")):
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1
                assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} has {length} lines"


def test_the_library_imports_nothing_from_slicer_qt_or_vtk():
    stdlib = set(sys.stdlib_module_names)
    for path in sorted(LIB.glob("*.py")):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: its own package
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in (
                    "slicer",
                    "qt",
                    "vtk",
                    "ctk",
                    "PythonQt",
                    "sitkUtils",
                    "mrml",
                ), f"{path.name}: {name}"
                assert top in stdlib or top == "__future__", f"{path.name} imports {name}: not standard library"


def _imports(path: Path) -> list[tuple[str, list[ast.alias]]]:
    """(module, names) of every import of a file, relative ones made absolute (``import x``: no names)."""
    package = path.parent.name if path.parent != MODULE else ""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            module = (f"{package}.{node.module}" if node.module else package) if node.level else node.module
            found.append((module, node.names))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_the_layers_import_one_way():
    """LowDoseDenoise.py -> LowDoseDenoiseSlicer -> LowDoseDenoiseLib, never back."""
    for path in sorted(SLICER_SIDE.glob("*.py")):
        for module, _ in _imports(path):
            assert module.split(".")[0] != "LowDoseDenoise", f"{path.name} imports the module file ({module})"
    for path in sorted(LIB.glob("*.py")):
        for module, _ in _imports(path):
            assert module.split(".")[0] not in ("LowDoseDenoise", "LowDoseDenoiseSlicer"), f"{path.name}: {module}"


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in _tree(path).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def test_every_name_taken_from_the_modules_packages_exists_there():
    """``from LowDoseDenoiseLib.x import y`` and ``messages.y`` find ``y``: a rename cannot break Slicer unseen."""
    ours = ("LowDoseDenoiseLib", "LowDoseDenoiseSlicer")
    for path in sorted(_module_files(".py")):
        modules = {}  # a name bound to one of our modules -> its file
        for module, names in _imports(path):
            if module.split(".")[0] not in ours:
                continue
            source = _source_of(module)
            assert source.is_file(), f"{path.name} imports {module}: no such file"
            for alias in names:
                if _source_of(f"{module}.{alias.name}").is_file():  # a module of the package
                    modules[alias.asname or alias.name] = _source_of(f"{module}.{alias.name}")
                else:
                    assert alias.name in _top_level_names(source), f"{path.name}: {alias.name} is not in {module}"
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                assert node.attr in _top_level_names(
                    modules[node.value.id]
                ), f"{path.name}:{node.lineno} {node.value.id}.{node.attr} does not exist"


# ----------------------------------------------------------------------------------------- the .ui file


def _ui_object_names() -> dict[str, str]:
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    names = {}
    for element in root.iter():
        if element.tag in ("widget", "layout", "spacer") and element.get("name"):
            name = element.get("name")
            assert name not in names, f"objectName {name} used twice in {UI_FILE.name}"
            names[name] = element.get("class", element.tag)
    return names


def test_the_ui_file_is_well_formed_and_declares_its_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    assert root.findtext("class") == "LowDoseDenoise"
    top = root.find("widget")
    assert top.get("name") == "LowDoseDenoise" and top.get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"custom widgets not declared: {custom - declared}"
    names = _ui_object_names()
    for connection in root.iter("connection"):  # the node selectors get the scene
        assert connection.findtext("sender") in names and connection.findtext("receiver") in names
    selectors = {n for n, c in names.items() if c == "qMRMLNodeComboBox"}
    assert selectors == {c.findtext("receiver") for c in root.iter("connection")}


def test_every_widget_the_code_uses_is_in_the_ui_file():
    names = _ui_object_names()
    used = {
        node.attr
        for path in _slicer_side_files()
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and _is_self_attr(node.value, "ui")
    }
    assert used, "the widget uses no self.ui.<name>?"
    missing = sorted(used - set(names))
    assert not missing, f"self.ui.<name> not in {UI_FILE.name}: {missing}"
    # And the other way round: every interactive widget in the .ui is wired up in the code.
    interactive = {
        n
        for n, c in names.items()
        if c
        in ("QPushButton", "QCheckBox", "QComboBox", "QTableWidget", "qMRMLNodeComboBox", "QProgressBar", "QLineEdit")
    }
    assert not interactive - used, f"widgets in the .ui that the code never uses: {sorted(interactive - used)}"


# What Slicer's base classes give the widget and the logic (ScriptedLoadableModule.py, VTKObservationMixin).
WIDGET_INHERITED = {
    "resourcePath",
    "addObserver",
    "removeObservers",
    "removeObserver",
    "setup",
    "onReload",
    "layout",
    "parent",
    "moduleName",
    "developerMode",
}
LOGIC_INHERITED = {"getParameterNode", "isValidInputOutputData", "moduleName"}


def test_every_slot_and_logic_method_the_widget_calls_exists():
    """Across the widget and its sections, the logic and its views: slots, ``self.logic.<x>`` and ``self.<x>()``."""
    widget, logic = _parts("LowDoseDenoiseWidget"), _parts("LowDoseDenoiseLogic")
    widget_methods = set().union(*map(_methods, widget))
    logic_members = set().union(*map(_methods, logic)) | _assigned(logic)
    for part in widget:
        for node in ast.walk(part):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect":
                slot = node.args[-1] if node.args else None
                if isinstance(slot, ast.Attribute) and _is_self_attr(slot, slot.attr):
                    assert slot.attr in widget_methods, f"slot self.{slot.attr} is not a method of the widget"
            if isinstance(node, ast.Attribute) and _is_self_attr(node.value, "logic"):
                assert node.attr in logic_members, f"{part.name}: self.logic.{node.attr} does not exist"
            if _is_self_call(node):
                assert (
                    node.func.attr in widget_methods | WIDGET_INHERITED
                ), f"{part.name}: self.{node.func.attr}() is not a widget method"
    for part in logic:
        for node in ast.walk(part):
            if _is_self_call(node):
                assert (
                    node.func.attr in logic_members | LOGIC_INHERITED
                ), f"{part.name}: self.{node.func.attr}() is not a logic method"
    test = _class(_tree(MODULE_FILE), "LowDoseDenoiseTest")
    for node in ast.walk(test):
        if isinstance(node, ast.Attribute) and _is_self_attr(node.value, "logic"):
            assert node.attr in logic_members, f"test calls self.logic.{node.attr}"


def test_every_attribute_the_widget_and_the_logic_use_is_declared_in_init():
    """The state the sections share (``self.job``, ``self.info``...) is declared in an ``__init__`` (or the
    widget's ``setup``), and nothing reads or writes any other: a misspelt name cannot hide."""
    for name, inherited in (("LowDoseDenoiseWidget", WIDGET_INHERITED), ("LowDoseDenoiseLogic", LOGIC_INHERITED)):
        parts = _parts(name)
        declared = _assigned(
            [
                f
                for part in parts
                for f in part.body
                if isinstance(f, ast.FunctionDef) and f.name in ("__init__", "setup")
            ]
        )
        known = set().union(*map(_methods, parts)) | declared | inherited
        for part in parts:
            for node in ast.walk(part):
                if isinstance(node, ast.Attribute) and _is_self_attr(node, node.attr):
                    assert node.attr in known, f"{part.name}:{node.lineno} self.{node.attr} is not declared in __init__"


def test_the_server_token_field_sits_with_the_server_address_and_hides_what_is_typed():
    root = ET.parse(UI_FILE).getroot()
    server = next(w for w in root.iter("widget") if w.get("name") == "serverCollapsibleButton")
    field = next((w for w in server.iter("widget") if w.get("name") == "serverTokenLineEdit"), None)
    assert field is not None and field.get("class") == "QLineEdit", "no Server token field in the Server section"
    echo = {p.get("name"): p.findtext("enum") for p in field.findall("property")}.get("echoMode")
    assert echo == "QLineEdit::Password"
    assert "lowdose serve --show-token" in ET.tostring(field, encoding="unicode")  # the tooltip says where it is
    labels = [w.findtext("property/string") for w in server.iter("widget") if w.get("class") == "QLabel"]
    assert "Server token:" in labels


def test_the_widget_sends_the_token_it_shows_and_never_logs_it():
    """Every request the widget starts passes the field's token; no logging call or message mentions it."""
    starts = [
        n
        for part in _parts("LowDoseDenoiseWidget")
        for n in ast.walk(part)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and _is_self_attr(n.func.value, "logic")
        and n.func.attr in ("startDenoise", "startFidelity", "client")
    ]
    assert {n.func.attr for n in starts} == {"startDenoise", "startFidelity", "client"}
    for call in starts:
        passed = [*call.args, *(k.value for k in call.keywords)]
        assert any(
            isinstance(a, ast.Name)
            and a.id == "token"
            or isinstance(a, ast.Call)
            and _is_self_attr(a.func, "serverToken")
            for a in passed
        ), f"self.logic.{call.func.attr}(...) at line {call.lineno} is not given the token"
    shown = 0
    for path in _slicer_side_files():
        for node in ast.walk(_tree(path)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            func = node.func
            logs = isinstance(func.value, ast.Name) and func.value.id == "logging"
            displays = func.attr in ("errorDisplay", "delayDisplay", "confirmYesNoDisplay") or (
                func.attr in ("setText", "setToolTip") and not _is_self_attr(func.value, "ui", "serverTokenLineEdit")
            )
            if logs or displays:
                shown += 1
                used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                used |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
                assert not used & {
                    "token",
                    "serverToken",
                    "_token",
                }, f"{path.name}:{node.lineno} shows or logs the token"
    assert shown > 20  # the check looked at the module's messages
    # The texts themselves come from LowDoseDenoiseLib.messages, which is never handed a token.
    for node in ast.walk(_tree(LIB / "messages.py")):
        if isinstance(node, ast.FunctionDef):
            assert not {a.arg for a in node.args.args} & {
                "token",
                "server_token",
            }, f"messages.{node.name} takes a token"


# ----------------------------------------------------------------------------------------- the self-ensemble


def _form_cells(layout_name: str) -> dict[tuple[int, int], str]:
    """(row, column) -> the name of what fills that cell of a QFormLayout of the .ui; no cell used twice."""
    layout = next(e for e in ET.parse(UI_FILE).getroot().iter("layout") if e.get("name") == layout_name)
    cells = {}
    for item in layout.findall("item"):
        child = item.find("widget") if item.find("widget") is not None else item.find("layout")
        cell = (int(item.get("row")), int(item.get("column")))
        assert cell not in cells, f"{layout_name}: row {cell[0]}, column {cell[1]} holds {cells.get(cell)} too"
        cells[cell] = child.get("name")
    return cells


def test_the_self_ensemble_menu_sits_under_the_strength_and_steps_menus():
    names = _ui_object_names()
    assert names["ensembleComboBox"] == "QComboBox" and names["ensembleLabel"] == "QLabel"
    label = next(w for w in ET.parse(UI_FILE).getroot().iter("widget") if w.get("name") == "ensembleLabel")
    assert label.findtext("property/string") == "Self-ensemble:"
    cells = _form_cells("denoiseFormLayout")
    where = {name: cell for cell, name in cells.items()}
    row = where["ensembleComboBox"][0]
    assert (where["ensembleLabel"], where["ensembleComboBox"]) == ((row, 0), (row, 1))
    assert (where["strengthComboBox"][0], where["stepsComboBox"][0]) == (row - 2, row - 1)
    assert where["denoiseButton"][0] == row + 1  # chosen right before pressing Denoise
    rows = sorted({r for r, _ in cells})
    assert rows == list(range(len(rows))), f"rows of the denoise form: {rows}"


def _method(parts: list[ast.ClassDef], name: str) -> ast.FunctionDef:
    found = [f for part in parts for f in part.body if isinstance(f, ast.FunctionDef) and f.name == name]
    assert len(found) == 1, f"{name}: {len(found)} definitions"
    return found[0]


def _called(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def _is_ensemble(node) -> bool:
    """``ensemble`` or ``context["ensemble"]``."""
    return (isinstance(node, ast.Name) and node.id == "ensemble") or (
        isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "ensemble"
    )


def _ensemble_position(function: ast.FunctionDef) -> int:
    """Where ``ensemble`` goes among a function's positional arguments (``self`` left out)."""
    names = [a.arg for a in function.args.args]
    assert "ensemble" in names, f"{function.name} takes no ensemble"
    return names.index("ensemble") - (names[:1] == ["self"])


# (class, method) -> the calls in it that must be given the self-ensemble chosen
ENSEMBLE_PASSED = {
    ("LowDoseDenoiseWidget", "onDenoise"): ("startDenoise",),
    ("LowDoseDenoiseWidget", "onFidelity"): ("startFidelity",),
    ("LowDoseDenoiseWidget", "startJob"): ("update",),  # the job's context
    ("LowDoseDenoiseWidget", "finishDenoise"): ("loadDenoised",),
    ("LowDoseDenoiseWidget", "finishFidelity"): ("fidelityDenoised",),
    ("LowDoseDenoiseLogic", "startDenoise"): ("denoise",),  # the client's
    ("LowDoseDenoiseLogic", "startFidelity"): ("fidelity",),
    ("LowDoseDenoiseLogic", "denoise"): ("startDenoise", "loadDenoised"),
    ("LowDoseDenoiseLogic", "loadDenoised"): ("loadDenoisedFile",),
    ("LowDoseDenoiseLogic", "loadDenoisedFile"): ("denoised_record", "denoised_volume_name"),
    ("LowDoseDenoiseLogic", "denoisedFor"): ("made_with",),
    ("LowDoseDenoiseLogic", "fidelityDenoised"): ("denoisedFor", "loadDenoisedFile"),
}


def test_the_self_ensemble_chosen_goes_with_every_request_and_into_every_record():
    """From the menu to the client's request and to the record, name and reuse of a denoised volume: each call
    on the way is given ``ensemble``, by keyword or in the position of the callee's ``ensemble``."""
    parts = {name: _parts(name) for name in ("LowDoseDenoiseWidget", "LowDoseDenoiseLogic")}
    results_functions = {f.name: f for f in _tree(LIB / "results.py").body if isinstance(f, ast.FunctionDef)}
    client_class = _class(_tree(LIB / "client.py"), "LowDoseClient", LIB / "client.py")
    callees = {**results_functions, **{f.name: f for f in client_class.body if isinstance(f, ast.FunctionDef)}}
    for (owner, method), names in ENSEMBLE_PASSED.items():
        function = _method(parts[owner], method)
        if method not in ("onDenoise", "onFidelity", "startJob", "finishDenoise", "finishFidelity"):
            assert _ensemble_position(function) >= 0  # the logic takes it
        for name in names:
            calls = [n for n in ast.walk(function) if isinstance(n, ast.Call) and _called(n) == name]
            assert calls, f"{owner}.{method} does not call {name}"
            for call in calls:
                if any(k.arg == "ensemble" and _is_ensemble(k.value) for k in call.keywords):
                    continue
                callee = callees.get(name) or _method(parts["LowDoseDenoiseLogic"], name)
                position = _ensemble_position(callee)
                assert len(call.args) > position and _is_ensemble(
                    call.args[position]
                ), f"{owner}.{method}: {name}(...) at line {call.lineno} is not given the self-ensemble"


def test_the_widget_fills_the_self_ensemble_menu_and_remembers_the_choice():
    widget = _parts("LowDoseDenoiseWidget")

    def menu_calls(function: ast.FunctionDef, method: str) -> list[ast.Call]:
        return [
            n
            for n in ast.walk(function)
            if isinstance(n, ast.Call)
            and _called(n) == method
            and _is_self_attr(n.func.value, "ui", "ensembleComboBox")
        ]

    fill = _method(widget, "fillChoices")
    loops = [n for n in ast.walk(fill) if isinstance(n, ast.For) and getattr(n.iter, "id", "") == "ENSEMBLE_SIZES"]
    assert len(loops) == 1, "the menu is not filled from ENSEMBLE_SIZES"
    (add,) = menu_calls(loops[0], "addItem")  # one item per size: its label, the size as its data
    assert _called(add.args[0]) == "ensemble_label" and add.args[1].id == loops[0].target.id
    (choose,) = menu_calls(fill, "setCurrentIndex")  # the size chosen last time
    assert any(
        isinstance(n, ast.Call) and _is_self_attr(n.func, "logic", "settings", "ensemble") for n in ast.walk(choose)
    )
    (tip,) = menu_calls(fill, "setToolTip")
    assert _called(tip.args[0]) == "ensemble_tooltip"
    assert menu_calls(fill, "clear"), "the menu is not emptied before it is filled (Reload would double it)"

    prepare = _method(widget, "prepareRequest")
    read = [n for n in ast.walk(prepare) if isinstance(n, ast.Call) and _called(n) == "ensemble_choice"]
    assert len(read) == 1 and _is_self_attr(read[0].args[0], "ui", "ensembleComboBox", "currentText")
    saved = [
        n
        for n in ast.walk(prepare)
        if isinstance(n, ast.Call) and _is_self_attr(n.func, "logic", "settings", "set_ensemble")
    ]
    assert len(saved) == 1 and _is_ensemble(saved[0].args[0])
    returned = [n.value for n in ast.walk(prepare) if isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple)]
    assert returned and all(_is_ensemble(r.elts[-1]) for r in returned), "the request does not carry the ensemble"
    for method in ("onDenoise", "onFidelity", "startJob"):  # each unpacks the request with the ensemble last
        unpacked = [
            n.targets[0]
            for n in ast.walk(_method(widget, method))
            if isinstance(n, ast.Assign)
            and isinstance(n.targets[0], ast.Tuple)
            and getattr(n.value, "id", "") == "request"
        ]
        assert unpacked and _is_ensemble(unpacked[0].elts[-1]), method


# ----------------------------------------------------------------------------------------- CMake


def _cmake_listed_files() -> set[Path]:
    listed = set()
    for cmake in MODULE.rglob("CMakeLists.txt"):
        text = re.sub(r"#[^\n]*", "", cmake.read_text())
        module_name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text)
        if module_name:
            text = text.replace("${MODULE_NAME}", module_name.group(1))
        for token in re.findall(r"[\w./${}-]+\.(?:py|ui|png)\b", text):
            assert "$" not in token, f"{cmake}: unexpanded variable in {token}"
            listed.add((cmake.parent / token).resolve())
    return listed


def test_the_cmake_lists_name_exactly_the_modules_files():
    existing = {p.resolve() for p in _module_files(".py", ".ui", ".png")}
    listed = _cmake_listed_files()
    assert not listed - existing, f"listed in CMake but missing: {sorted(map(str, listed - existing))}"
    assert not existing - listed, f"files CMake does not list: {sorted(map(str, existing - listed))}"


def test_the_module_cmake_builds_a_scripted_module_with_its_tests():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert re.search(r"set\(MODULE_NAME LowDoseDenoise\)", text)
    assert re.search(
        r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s*SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
        r"\s*RESOURCES \$\{MODULE_PYTHON_RESOURCES\}",
        text,
    )
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text and "add_subdirectory(Testing)" in text
    assert "add_subdirectory(Python)" in (MODULE / "Testing" / "CMakeLists.txt").read_text()


def test_the_extension_cmake_has_what_slicers_extension_build_needs():
    text = (EXTENSION / "CMakeLists.txt").read_text()
    assert re.search(r"^cmake_minimum_required\(", text, re.M)
    assert re.search(r"^project\(LowDoseDenoise\)", text, re.M)
    for variable in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert re.search(rf'^set\({variable} "[^"]*"\)', text, re.M), variable
    order = [
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(LowDoseDenoise)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.find(line) for line in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), dict(zip(order, positions))


# ----------------------------------------------------------------------------------------- icon, library tests


def test_the_icon_is_a_real_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert 32 <= width <= 512 and width == height
    offset, chunks = 8, []
    while offset < len(data):  # walk every chunk and check its CRC
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind}"
        chunks.append(kind)
        offset += 12 + length
    assert chunks[-1] == b"IEND" and b"IDAT" in chunks

    from PIL import Image

    with Image.open(ICON) as image:
        image.load()
        extrema = image.convert("L").getextrema()
    assert extrema[1] - extrema[0] > 100  # a picture, not a blank square


def test_the_library_unit_tests_pass_in_a_plain_python():
    """Testing/Python/LowDoseDenoiseLibTest.py, as Slicer runs it, in a separate interpreter (no repo imports)."""
    script = MODULE / "Testing" / "Python" / "LowDoseDenoiseLibTest.py"
    result = subprocess.run([sys.executable, "-I", str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"Ran \d+ tests", result.stderr) and "OK" in result.stderr
