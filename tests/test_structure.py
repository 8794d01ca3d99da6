"""The code's structure, checked on the source. The rules:

1. One read-only configuration: after resolution nothing assigns into ``args`` / ``cfg`` / ``config``.
2. Mode names are compared only in modes.py (``MODES`` and ``get_mode``); the rest asks the mode object.
3. Every file name a run writes is spelled in one module.
4. The teacher-student pair is a declared type (models_pair.TeacherStudentPair) that every pair implements.
5. The mode is looked up once per run.
6. One model identity: util.model_record.describe_model is the one function that describes a run's model, and
   models_spec.student_architecture the one rule for the student's architecture; no other code reads the model's
   arguments out of a checkpoint's recorded flags, and the routes that did (MODEL_ARGS, recorded_model,
   checkpoint_model_args, trained_architecture, checkpoint_architecture, finetune_source) are gone.
7. The model layer (models_*.py) raises its own errors in the model's words: no UserError, no command-line flag
   in a raised message; the command line names the flags (util.model_record.flag_errors).
8. Small pieces: no production function longer than 80 lines except argument parsers; models_dual_vit.py, the
   pair, under 650 lines.
"""
import ast
import os
import re

import pytest
import torch
from helpers import ROOT, TINY_ARCH, args_for

import main_finetune
import modes
from models_dual_vit import DualViT, build_dual_vit
from models_pair import TeacherStudentPair
from models_probe import ProbeDistiller
from models_vit import create_vit
from util.config import Config

# names the run's configuration goes by in the code
CONFIG_NAMES = {'args', 'cfg', 'config'}
RUN_FILES = {'checkpoint.pth', 'checkpoint-best.pth', 'log.txt', 'eval_results.json', 'run.lock'}


def project_sources() -> dict[str, ast.Module]:
    """Every non-test Python file of the project, parsed."""
    trees = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('tests', '__pycache__')]
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                with open(path, encoding='utf-8') as f:
                    trees[os.path.relpath(path, ROOT)] = ast.parse(f.read(), path)
    return trees


def writes_to_config(tree: ast.Module) -> list[int]:
    """Lines that assign an attribute of, setattr on, or update the vars of a name in CONFIG_NAMES."""
    def is_config(node) -> bool:
        return isinstance(node, ast.Name) and node.id in CONFIG_NAMES

    lines = []
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(t, ast.Attribute) and is_config(t.value):
                    lines.append(node.lineno)
        if isinstance(node, ast.Call):
            func = node.func
            named = isinstance(func, ast.Name) and func.id in ('setattr', 'delattr')
            if named and node.args and is_config(node.args[0]):
                lines.append(node.lineno)
            if (isinstance(func, ast.Attribute) and func.attr == 'update' and isinstance(func.value, ast.Call)
                    and isinstance(func.value.func, ast.Name) and func.value.func.id == 'vars'
                    and func.value.args and is_config(func.value.args[0])):
                lines.append(node.lineno)
    return lines


def test_nothing_writes_into_the_configuration():
    found = {path: lines for path, tree in project_sources().items() if (lines := writes_to_config(tree))}
    assert found == {}, f"writes into a run's configuration (use Config.replace during resolution): {found}"


def test_the_checker_finds_writes():
    tree = ast.parse("args.lr = 1\ncfg.a, x = 1, 2\nsetattr(config, 'b', 2)\nvars(args).update(c=3)\n"
                     "args = args.replace(lr=1)\nself.cfg = cfg\n")
    assert writes_to_config(tree) == [1, 2, 3, 4]


def test_the_resolved_configuration_is_read_only():
    cfg = Config.of({'lr': 1.0})
    with pytest.raises(AttributeError, match='read-only'):
        cfg.lr = 2.0
    assert cfg.replace(lr=2.0).lr == 2.0 and cfg.lr == 1.0


def mode_name_comparisons(tree: ast.Module) -> list[int]:
    """Lines comparing a mode (a name or attribute called ``*mode*``, or ``x.get('mode')``) with a --mode name
    (==, !=, in, not in a literal holding one)."""
    names = set(modes.MODES)

    def literal_names(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(isinstance(e, ast.Constant) and e.value in names for e in node.elts)
        return False

    def names_a_mode(node) -> bool:
        if isinstance(node, ast.Name):
            return 'mode' in node.id
        if isinstance(node, ast.Attribute):
            return 'mode' in node.attr
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'get':
            return any(isinstance(a, ast.Constant) and a.value == 'mode' for a in node.args)
        return False

    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and any(literal_names(side) for side in [node.left, *node.comparators])
            and any(names_a_mode(side) for side in [node.left, *node.comparators])]


# the one other reader of a mode's name: converting the attention transfer reference's checkpoints, whose
# recorded mode is the reference's own (its copy modes need the teacher at evaluation)
FOREIGN_MODE_NAMES = {os.path.join('util', 'pretrained.py')}


def test_mode_names_are_compared_only_in_modes_py():
    # (the benchmarks' step tables have rows of their own: plain, teacher, copy, distill)
    found = {path: lines for path, tree in project_sources().items()
             if path not in {'modes.py', *FOREIGN_MODE_NAMES} and not path.startswith('benchmarks')
             and (lines := mode_name_comparisons(tree))}
    assert found == {}, f"mode names compared outside modes.py: {found}"
    assert mode_name_comparisons(ast.parse("if mode == 'copy': pass\nok = args.mode in ('none', 'x')\n"
                                           "a = saved.get('mode') != 'probe'\nb = kind == 'probe'\n")) == [1, 2, 3]


def test_run_files_are_named_in_one_module():
    found = {path for path, tree in project_sources().items()
             for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in RUN_FILES}
    assert found == {os.path.join('util', 'output.py')}


# ---- the teacher-student pair ----------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['none', 'copy', 'distill'])
def test_transfer_pairs_are_declared_pairs(mode):
    pair = build_dual_vit('vit_base_patch16_224', mode=mode, num_classes=3, img_size=32, teacher_kwargs=TINY_ARCH)
    assert isinstance(pair, TeacherStudentPair) and isinstance(pair, DualViT)
    assert pair.with_student(pair.student).teacher is pair.teacher
    pair.train()
    assert pair.training and (pair.teacher is None or not pair.teacher.training)


def test_the_probe_pair_is_a_declared_pair_and_compiles():
    vit = lambda: create_vit('vit_base_patch16_224', num_classes=3, global_pool='token', img_size=32, **TINY_ARCH)
    pair = ProbeDistiller(vit(), vit())
    assert isinstance(pair, TeacherStudentPair)
    x = torch.randn(2, 3, 32, 32)
    pair.train()
    eager = pair(x)
    pair.compile_blocks(backend='aot_eager')
    compiled = pair(x)
    for a, b in zip(eager[:2], compiled[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError):
        pair.set_grad_checkpointing(True)


def test_a_pair_must_implement_the_interface():
    class Partial(TeacherStudentPair):
        needs_teacher_at_eval = False

    with pytest.raises(TypeError, match='abstract'):
        Partial()


# ---- one lookup of the mode ------------------------------------------------------------------------------
def test_the_mode_is_looked_up_once_per_run(workdir, monkeypatch):
    calls = []
    lookup = modes.get_mode

    def counting(name):
        calls.append(name)
        return lookup(name)

    monkeypatch.setattr(modes, 'get_mode', counting)
    monkeypatch.setattr(main_finetune, 'get_mode', counting)
    main_finetune.run(args_for(workdir, workdir.root / 'one_lookup', '--mode', 'distill', epochs=1))
    assert calls == ['distill']


# ---- one model identity -------------------------------------------------------------------------------------
OLD_ROUTES = ('MODEL_ARGS', 'recorded_model', 'checkpoint_model_args', 'trained_architecture',
              'checkpoint_architecture', 'finetune_source', 'build_kd_pair', 'build_probe_distiller')
MODEL_ARG_KEYS = {'student_model', 'student_kwargs', 'model_kwargs', 'teacher_model'}


def model_arg_reads(tree: ast.Module) -> list[int]:
    """Lines reading a model argument out of a dict: ``x.get('student_model')`` or ``x['model_kwargs']``."""
    lines = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'get' \
                and node.args and isinstance(node.args[0], ast.Constant):
            key = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        if key in MODEL_ARG_KEYS:
            lines.append(node.lineno)
    return lines


def names_used(tree: ast.Module) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names} | \
        {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_one_model_description():
    sources = project_sources()
    old = {path: sorted(names_used(tree) & set(OLD_ROUTES)) for path, tree in sources.items()}
    assert {p: n for p, n in old.items() if n} == {}
    callers = {path for path, tree in sources.items() for node in ast.walk(tree) if isinstance(node, ast.Call)
               and getattr(node.func, 'id', getattr(node.func, 'attr', None)) == 'student_architecture'}
    # describe_model, and the notebook builder
    assert callers == {os.path.join('util', 'model_record.py'), 'models_dual_vit.py'}
    describers = {path for path, tree in sources.items() for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and getattr(node.func, 'id', getattr(node.func, 'attr', None)) == 'describe_model'}
    assert describers <= {os.path.join('util', 'model_record.py'), 'main_finetune.py'}
    reads = {path: lines for path, tree in sources.items() if path != os.path.join('util', 'model_record.py')
             and (lines := model_arg_reads(tree))}
    assert reads == {}, f"model arguments read out of a checkpoint's flags outside util/model_record.py: {reads}"


def test_the_route_checkers_find_what_they_look_for():
    tree = ast.parse("a = saved.get('student_model')\nb = args['model_kwargs']\nc = x.get('mode')\n")
    assert model_arg_reads(tree) == [1, 2]
    assert 'MODEL_ARGS' in names_used(ast.parse("from modes import MODEL_ARGS\n"))


def flag_names_in_raises(tree: ast.Module) -> list[int]:
    """Lines of a raise in which UserError is named or a string holds a command-line flag (``--name``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for part in ast.walk(node.exc):
                if (isinstance(part, ast.Name) and part.id == 'UserError') or (
                        isinstance(part, ast.Constant) and isinstance(part.value, str)
                        and re.search(r'--[a-z]', part.value)):
                    found.append(node.lineno)
                    break
    return found


def test_the_model_layer_speaks_no_flags():
    models = {path: tree for path, tree in project_sources().items() if re.fullmatch(r'models_\w+\.py', path)}
    assert len(models) >= 9
    imports = {path for path, tree in models.items() if 'UserError' in names_used(tree)}
    assert imports == set()
    assert {path: lines for path, tree in models.items() if (lines := flag_names_in_raises(tree))} == {}
    assert flag_names_in_raises(ast.parse("raise ValueError(f'--layer_map {x}: bad')\nraise UserError('x')\n"
                                          "raise ValueError('layer map 0:x')\n")) == [1, 2]


PARSERS = {'get_args_parser', 'add_arguments'}


def test_functions_are_short():
    long = {f'{path}:{node.name}': node.end_lineno - node.lineno + 1 for path, tree in project_sources().items()
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name not in PARSERS and node.end_lineno - node.lineno + 1 > 80}
    assert long == {}
    with open(os.path.join(ROOT, 'models_dual_vit.py'), encoding='utf-8') as f:
        assert len(f.readlines()) < 650
