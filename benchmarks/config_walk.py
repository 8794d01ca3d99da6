"""A static count of how far a run's configuration travels: from ``main(args)`` of a script, every call that
passes the configuration on (as an argument, or a value built from it), followed into the project's own
functions, each function followed once.

    python benchmarks/config_walk.py [ROOT] [--entry main_finetune.main]

Counted, over the walk:
  stops    each call site in a visited function that passes the configuration to a project function
           (resolved through the module's imports; ``obj.method(cfg)`` followed into every project method of
           that name, ``self.method`` / ``super().method`` into those of its own module; one stop per site)
  modules  the modules those calls enter
  climbs   each call that enters a module the walk has already been in and left (the entry script included):
           the configuration going back into a module it passed through
  visits   calls into each module, from another one

What "passes it on" means: a method call on an object holding it (``self`` in a class with a ``cfg``
field), or an argument that is the configuration itself (see ``is_config``): a name bound to
it (the parameter that received it, or assigned ``Config.of(args)`` / ``cfg.replace(...)``), or any
``.cfg`` / ``.args`` attribute (``run.cfg``, ``self.cfg``). Values read out of it are not followed. Library
calls are not stops.
The count is heuristic (no types), the same rules on every revision: compare revisions, not absolute values.
"""
from __future__ import annotations

import argparse
import ast
import os
from collections import Counter

SKIP = {'.venv', 'tests', 'benchmarks', '.git', 'shared', 'docs', 'demo_runs'}


def modules(root: str) -> dict[str, ast.Module]:
    """The project's own modules by dotted name."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP and not d.startswith('.'))
        for name in sorted(files):
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
                with open(path) as f:
                    found[dotted.removesuffix('.__init__')] = ast.parse(f.read(), path)
    return found


class Index:
    """Where each function and method is defined, and what each module's names refer to."""

    def __init__(self, mods: dict[str, ast.Module]):
        self.functions: dict[tuple[str, str], ast.FunctionDef] = {}  # (module, qualname)
        self.methods: dict[str, list[tuple[str, str]]] = {}          # method name -> [(module, qualname)]
        self.imports: dict[str, dict[str, tuple[str, str]]] = {}     # module -> local name -> (module, name)
        self.carriers: set[str] = set()                               # classes holding the configuration
        for mod, tree in mods.items():
            self.imports[mod] = {}
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.functions[(mod, node.name)] = node
                elif isinstance(node, ast.ClassDef):
                    self.functions[(mod, node.name)] = node  # a class: calling it runs __init__
                    if any(isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                           and n.target.id in CONFIG_ATTRS for n in node.body) or \
                            any(isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                                and n.attr in CONFIG_ATTRS for n in ast.walk(node)):
                        self.carriers.add(node.name)
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            key = (mod, f'{node.name}.{item.name}')
                            self.functions[key] = item
                            self.methods.setdefault(item.name, []).append(key)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    for alias in node.names:
                        self.imports[mod][alias.asname or alias.name] = (node.module, alias.name)

    def resolve(self, mod: str, func: ast.expr) -> list[tuple[str, str]]:
        """The project functions a call's callee may be."""
        if isinstance(func, ast.Name):
            if (mod, func.id) in self.functions:
                return [self.target(mod, func.id)]
            source = self.imports[mod].get(func.id)
            if source and source in self.functions:
                return [self.target(*source)]
            return []
        if isinstance(func, ast.Attribute) and not func.attr.startswith('__'):
            found = self.methods.get(func.attr, [])
            receiver = func.value
            if (isinstance(receiver, ast.Name) and receiver.id in ('self', 'cls')) or \
                    (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name)
                     and receiver.func.id == 'super'):
                return [key for key in found if key[0] == mod]  # its own class or a base in its module
            return found  # any project method of that name: every implementation a call may dispatch to
        return []

    def carries(self, mod: str, call: ast.Call) -> bool:
        """Whether ``call`` returns an object holding the configuration (a carrier class, or a function
        annotated to return one)."""
        for key in self.resolve(mod, call.func):
            node = self.functions[key]
            if key[1].endswith('__init__') and key[1].split('.')[0] in self.carriers:
                return True
            returns = getattr(node, 'returns', None)
            if isinstance(node, ast.ClassDef):
                return node.name in self.carriers
            if returns is not None and any(isinstance(n, ast.Name) and n.id in self.carriers
                                           for n in ast.walk(returns)):
                return True
            if isinstance(returns, ast.Constant) and str(returns.value) in self.carriers:
                return True
        return False

    def target(self, mod: str, name: str) -> tuple[str, str]:
        node = self.functions[(mod, name)]
        if isinstance(node, ast.ClassDef):
            init = (mod, f'{name}.__init__')
            return init if init in self.functions else (mod, name)
        return (mod, name)


CONFIG_ATTRS = {'cfg', 'args', 'config'}


def is_config(expr: ast.AST, bound: set[str]) -> bool:
    """An expression that is the configuration itself: a bound name, any ``.cfg`` / ``.args`` / ``.config``
    attribute (``run.cfg``, ``self.cfg``), or a copy of one (``cfg.replace(...)``, ``Config.of(cfg)``)."""
    if isinstance(expr, ast.Name):
        return expr.id in bound
    if isinstance(expr, ast.Attribute):
        return expr.attr in CONFIG_ATTRS
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
        if expr.func.attr == 'replace' and is_config(expr.func.value, bound):
            return True
        return expr.func.attr == 'of' and any(is_config(a, bound) for a in expr.args)
    return False


def passes(call: ast.Call, bound: set[str]) -> bool:
    """The call hands the configuration on: as an argument, or as (the object holding it that is) the receiver
    of a method call (``trainer.fit()``, ``self.evaluate()`` in a class holding it)."""
    receiver = call.func.value if isinstance(call.func, ast.Attribute) else None
    return any(is_config(a, bound) for a in call.args) or any(is_config(k.value, bound) for k in call.keywords) \
        or (isinstance(receiver, ast.Name) and receiver.id in bound)


def parameters(node: ast.AST) -> list[str]:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return []
    names = [a.arg for a in node.args.posonlyargs + node.args.args]
    return names[1:] if names and names[0] in ('self', 'cls') else names


def received(node: ast.AST, call: ast.Call, bound: set[str]) -> set[str]:
    """The callee's parameters that receive the configuration from ``call``."""
    params = parameters(node)
    names = {params[i] for i, arg in enumerate(call.args) if i < len(params) and is_config(arg, bound)}
    names |= {kw.arg for kw in call.keywords if kw.arg and is_config(kw.value, bound)}
    return names or set(params[:1])


def bound_names(index: Index, mod: str, node: ast.AST, start: set[str]) -> set[str]:
    """``start`` and every name assigned the configuration (``cfg = Config.of(args)``, ``cfg = cfg.replace(...)``)
    or an object holding it (``run = resolve_args(cfg)`` returning a class with a ``cfg`` field)."""
    bound = set(start)
    while True:
        before = len(bound)
        for n in ast.walk(node):
            if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None and (
                    is_config(n.value, bound) or (isinstance(n.value, ast.Call) and passes(n.value, bound)
                                                  and index.carries(mod, n.value))):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                bound |= {t.id for t in targets if isinstance(t, ast.Name)}
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Tuple):  # cfg, mode = run.cfg, run.mode
                for target in (t for t in n.targets if isinstance(t, ast.Tuple)):
                    bound |= {t.id for t, v in zip(target.elts, n.value.elts)
                              if isinstance(t, ast.Name) and is_config(v, bound)}
        if len(bound) == before:
            return bound


def walk(index: Index, entry: tuple[str, str], start: set[str]) -> dict:
    stops, climbs, visits, entered = 0, 0, Counter(), set()
    seen, left, sites = {entry}, {entry[0]}, []

    def visit(key: tuple[str, str], params: set[str]) -> None:
        nonlocal stops, climbs
        node = index.functions[key]
        holder = '.' in key[1] and key[1].split('.')[0] in index.carriers
        bound = bound_names(index, key[0], node, params | ({'self'} if holder else set()))
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            if not passes(call, bound) or is_config(call, bound):
                continue  # a copy of the configuration (cfg.replace(...), Config.of(cfg)) is not a stop
            targets = index.resolve(key[0], call.func)
            if not targets:
                continue
            stops += 1  # one call site, followed into every function it may reach
            sites.append(f"{key[0]}.{key[1]} -> " + ', '.join(f'{m}.{f}' for m, f in targets))
            for module in {t[0] for t in targets} - {key[0]}:
                visits[module] += 1
                climbs += module in left
                left.add(module)
            for target in targets:
                entered.add(target[0])
                if target not in seen:
                    seen.add(target)
                    visit(target, received(index.functions[target], call, bound))

    visit(entry, start)
    return {'stops': stops, 'modules': len(entered), 'climbs': climbs, 'visits': visits, 'sites': sites}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', nargs='?', default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument('--entry', default='main_finetune.main', help='module.function whose first parameter '
                        'is the configuration')
    parser.add_argument('--sites', action='store_true', help='also list every stop (caller -> callees)')
    args = parser.parse_args()
    index = Index(modules(args.root))
    mod, _, name = args.entry.rpartition('.')
    result = walk(index, (mod, name), set(parameters(index.functions[(mod, name)])[:1]))
    util = sum(v for m, v in result['visits'].items() if m.startswith('util.'))
    print(f"| entry | stops | modules | climbs back | modes.py visits | util/ visits |\n|---|---|---|---|---|---|\n"
          f"| {args.entry} | {result['stops']} | {result['modules']} | {result['climbs']} | "
          f"{result['visits'].get('modes', 0)} | {util} |")
    print('visits by module: ' + ', '.join(f'{m} {v}' for m, v in result['visits'].most_common()))
    if args.sites:
        print('\n'.join(result['sites']))


if __name__ == '__main__':
    main()
