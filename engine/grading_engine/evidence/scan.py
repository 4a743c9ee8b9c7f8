"""Static scan of the code a student wrote, in the grader's process.

It reads the submission as it arrived, before anything runs, so nothing the
student's code does at run time can hide from it; it can be evaded only by
obfuscation, and the usual tools of obfuscation (``exec``, ``eval``,
``__import__``, ``importlib``, ``getattr`` with a computed name on a module,
``ctypes``, ``gc``, frames) are themselves reported.

Each finding is ``{"kind", "detail", "where"}``; kinds: ``ipython_hook``,
``interpreter_hook``, ``patched_function``, ``file_access``, ``network``,
``process``, ``dynamic_code``.
"""

from __future__ import annotations

import ast
import functools
import re

from grading_engine.evidence.instrument import dotted, parse_cell

IPYTHON_ATTRS = {
    "input_transformers_cleanup", "input_transformers_post", "input_transformer_manager", "ast_transformers",
    "set_custom_exc", "custom_exceptions", "CustomTB", "showtraceback", "_showtraceback", "showsyntaxerror",
    "register_magic_function", "register_magics", "prefilter_manager", "display_pub", "displayhook",
    "run_cell", "run_cell_async", "run_code", "run_ast_nodes", "transform_cell", "events", "user_ns_hidden",
    "kernel", "shell_handlers", "execute_request", "iopub_socket", "session", "compile", "excepthook",
    "cleanup_transforms", "line_transforms", "token_transformers",
}
INTERPRETER_ATTRS = {
    "settrace", "setprofile", "excepthook", "displayhook", "addaudithook", "meta_path", "path_hooks",
    "_getframe", "f_back", "f_globals", "f_locals", "f_builtins", "tb_frame", "gi_frame", "cr_frame",
    "get_referrers", "get_referents", "get_objects", "__code__", "__globals__", "__closure__",
    "breakpointhook", "unraisablehook", "_current_frames", "setrecursionlimit", "setswitchinterval",
}
MODULE_ROOTS = {"torch", "np", "numpy", "F", "nn", "math", "operator", "builtins", "sys", "os", "IPython",
                "transformers", "course", "random", "functools", "inspect", "unittest", "pytest", "re", "json"}
NETWORK_MODULES = {"socket", "urllib", "http", "requests", "httpx", "ftplib", "smtplib", "poplib", "imaplib",
                   "telnetlib", "websocket", "websockets", "aiohttp", "paramiko", "ssl", "xmlrpc", "asyncssh",
                   "huggingface_hub", "urllib3", "pycurl"}
PROCESS_MODULES = {"subprocess", "multiprocessing", "pty", "signal", "resource", "atexit", "threading",
                   "_thread", "concurrent", "sched", "asyncio.subprocess"}
HOOK_MODULES = {"ctypes", "cffi", "gc", "inspect", "dis", "marshal", "types", "importlib", "imp", "builtins",
                "pickle", "dill", "cloudpickle", "code", "codeop", "traceback", "linecache", "nbclient",
                "jupyter_client", "ipykernel", "zmq", "base64", "codecs", "zlib"}
FILE_MODULES = {"sqlite3", "nbformat", "nbgrader", "shelve", "dbm"}
PROCESS_CALLS = {"os.system", "os.popen", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os._exit", "os.abort",
                 "sys.exit", "exit", "quit", "os.execv", "os.execve", "os.execl", "os.execlp", "os.execvp",
                 "os.spawnl", "os.spawnv", "os.posix_spawn", "os.setsid", "os.setuid", "os.nice"}
FILE_CALLS = {"os.listdir", "os.scandir", "os.walk", "os.chdir", "os.remove", "os.unlink", "os.rmdir",
              "os.rename", "os.replace", "os.makedirs", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
              "os.link", "glob.glob", "glob.iglob", "shutil.rmtree", "shutil.copy", "shutil.copyfile",
              "shutil.copytree", "shutil.move", "os.path.expanduser", "os.getenv", "os.environ.get",
              "pathlib.Path.home", "Path.home", "os.path.expandvars"}
DYNAMIC_CALLS = {"exec", "eval", "compile", "__import__", "importlib.import_module", "importlib.reload",
                 "breakpoint"}  # vars() and globals() are honest introspection; writing through them is caught
SUSPICIOUS_TEXT = re.compile(r"(^/|^~|\.\./|(^|/)\.\.$|(^|/)source(/|$)|(^|/)release(/|$)|gradebook|\.ipynb|exchange|submitted|autograded|"
                             r"nbgrader|\.db$|/etc/|/root|/home/|/proc/|/work/|/srv/)")


class _Scanner(ast.NodeVisitor):
    def __init__(self, where: str, module_names: set[str]):
        self.where = where
        self.modules = module_names | MODULE_ROOTS
        self.found: list[dict] = []

    def add(self, kind: str, detail: str, node: ast.AST | None = None) -> None:
        line = f", line {node.lineno}" if node is not None and hasattr(node, "lineno") else ""
        self.found.append({"kind": kind, "detail": detail, "where": f"{self.where}{line}"})

    def _module_based(self, node: ast.AST) -> str | None:
        name = dotted(node)
        if name and name.split(".")[0] in self.modules:
            return name
        return None

    # imports
    def visit_Import(self, node):
        for a in node.names:
            self._imported(a.name, node)

    def visit_ImportFrom(self, node):
        if node.module:
            self._imported(node.module, node)
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in PROCESS_CALLS | FILE_CALLS | DYNAMIC_CALLS:
                    self.add("process" if full in PROCESS_CALLS else "dynamic_code" if full in DYNAMIC_CALLS
                             else "file_access", f"imports {full}", node)

    def _imported(self, name: str, node) -> None:
        root = name.split(".")[0]
        if root in NETWORK_MODULES or name in NETWORK_MODULES:
            self.add("network", f"imports {name}", node)
        elif root in PROCESS_MODULES or name in PROCESS_MODULES:
            self.add("process", f"imports {name}", node)
        elif root in HOOK_MODULES or name in HOOK_MODULES:
            self.add("interpreter_hook" if root not in ("importlib", "base64", "codecs", "zlib", "marshal", "pickle",
                                                        "dill", "cloudpickle") else "dynamic_code",
                     f"imports {name}", node)
        elif root in FILE_MODULES:
            self.add("file_access", f"imports {name}", node)
        elif root in ("os", "shutil", "glob", "pathlib", "tempfile", "io"):
            pass  # judged by what is done with them
        elif name in ("IPython.core.interactiveshell", "IPython.core.inputtransformer2", "IPython.core.ultratb"):
            self.add("ipython_hook", f"imports {name}", node)

    # attribute use
    def visit_Attribute(self, node):
        if node.attr in IPYTHON_ATTRS and self._looks_ipython(node.value):
            self.add("ipython_hook", f"uses {ast.unparse(node)}", node)
        elif node.attr in INTERPRETER_ATTRS:
            self.add("interpreter_hook", f"uses {ast.unparse(node)}", node)
        elif node.attr in ("environ",) and dotted(node.value) == "os":
            self.add("file_access", "reads os.environ", node)
        elif node.attr in ("parent", "parents") and re.search(r"cwd\(|getcwd\(|__file__|resolve\(|absolute\(",
                                                              ast.unparse(node.value)):
            self.add("file_access", f"climbs out of the working folder: {ast.unparse(node)[:80]}", node)
        self.generic_visit(node)

    def _looks_ipython(self, node) -> bool:
        text = ast.unparse(node)
        return "ipython" in text.lower() or "shell" in text.lower() or "kernel" in text.lower() or \
            isinstance(node, ast.Call) or text in ("ip", "sh", "ipy")

    def visit_Name(self, node):
        if node.id in ("__builtins__", "__builtin__"):
            self.add("interpreter_hook", f"uses {node.id}", node)
        self.generic_visit(node)

    # assignments: monkeypatching
    def _check_target(self, t, node) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self._check_target(e, node)
            return
        if isinstance(t, ast.Attribute):
            base = self._module_based(t.value)
            if base is not None:
                self.add("patched_function", f"replaces {base}.{t.attr}", node)
            elif t.attr.startswith("__") and t.attr.endswith("__") and t.attr not in ("__doc__",):
                self.add("patched_function", f"sets {ast.unparse(t)}", node)
        elif isinstance(t, ast.Subscript):
            base = dotted(t.value)
            if base in ("sys.modules", "builtins.__dict__", "__builtins__") or (
                    isinstance(t.value, ast.Call) and dotted(t.value.func) in ("globals", "vars")):
                self.add("patched_function", f"writes {ast.unparse(t)[:80]}", node)

    def visit_Assign(self, node):
        for t in node.targets:
            self._check_target(t, node)
        if self._fetches_module(node.value):
            # `m = sys.modules.get(name)`, `m = importlib.import_module(name)`: m is a module from now on
            self.modules |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        self.generic_visit(node)

    @staticmethod
    def _fetches_module(value: ast.AST) -> bool:
        if isinstance(value, ast.Subscript):
            return dotted(value.value) in ("sys.modules",)
        if isinstance(value, ast.Call):
            name = dotted(value.func) or ""
            return name in ("sys.modules.get", "sys.modules.__getitem__", "importlib.import_module",
                            "import_module", "__import__", "sys.modules.setdefault", "sys.modules.pop")
        return False

    def visit_AugAssign(self, node):
        self._check_target(node.target, node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        self._check_target(node.target, node)
        self.generic_visit(node)

    def visit_Delete(self, node):
        for t in node.targets:
            self._check_target(t, node)
        self.generic_visit(node)

    def visit_Global(self, node):
        self.generic_visit(node)

    # calls
    def visit_Call(self, node):
        name = dotted(node.func) or ""
        short = name.split(".")[-1]
        if name in ("setattr", "delattr", "object.__setattr__", "type.__setattr__") and node.args:
            base = self._module_based(node.args[0])
            if base is not None or (len(node.args) > 1 and not isinstance(node.args[1], ast.Constant)):
                self.add("patched_function", f"calls {ast.unparse(node)[:80]}", node)
        elif name == "getattr" and len(node.args) >= 2 and not isinstance(node.args[1], ast.Constant) and \
                self._module_based(node.args[0]) is not None:
            self.add("dynamic_code", f"calls {ast.unparse(node)[:80]}", node)
        if name in ("os.path.dirname", "os.path.split") and re.search(r"getcwd\(|cwd\(|__file__|abspath\(",
                                                                      ast.unparse(node)):
            self.add("file_access", f"climbs out of the working folder: {ast.unparse(node)[:80]}", node)
        if name in DYNAMIC_CALLS:
            self.add("dynamic_code", f"calls {name}()", node)
        elif name in PROCESS_CALLS:
            self.add("process", f"calls {name}()", node)
        elif name in FILE_CALLS or short in ("home", "expanduser", "expandvars"):
            if name in ("os.makedirs", "os.mkdir", "os.remove", "os.unlink") and not self._suspicious_args(node):
                pass
            else:
                self.add("file_access", f"calls {ast.unparse(node)[:80]}", node)
        elif short in ("open", "Path", "PurePath", "read_text", "read_bytes", "write_text", "write_bytes", "load",
                       "save", "loadtxt", "fromfile", "connect", "glob", "iterdir", "rglob", "listdir", "scandir",
                       "walk", "resolve", "parent", "parents") and self._suspicious_args(node):
            self.add("file_access", f"calls {ast.unparse(node)[:80]}", node)
        self.generic_visit(node)

    def _suspicious_args(self, node) -> bool:
        for a in list(node.args) + [k.value for k in node.keywords]:
            for c in ast.walk(a):
                if isinstance(c, ast.Constant) and isinstance(c.value, str) and SUSPICIOUS_TEXT.search(c.value):
                    return True
        if isinstance(node.func, ast.Attribute):
            for c in ast.walk(node.func.value):
                if isinstance(c, ast.Constant) and isinstance(c.value, str) and SUSPICIOUS_TEXT.search(c.value):
                    return True
        return False

    def visit_BinOp(self, node):
        # Path("a") / ".." / "source"
        if isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str) and SUSPICIOUS_TEXT.search(side.value):
                    self.add("file_access", f"builds the path {ast.unparse(node)[:80]}", node)
                    break
        self.generic_visit(node)


def imported_names(sources: list[str]) -> set[str]:
    """The names the import statements of these cells bind (first component)."""
    return set().union(*map(_imports_in, sources))


@functools.lru_cache(maxsize=4096)
def _imports_in(source: str) -> frozenset[str]:
    # cached: a class's notebooks share most of their cells, and a grading process sees them all
    tree = parse_cell(source)
    if tree is None:
        return frozenset()
    return frozenset((a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names)


def scan_code(source: str, where: str, module_names: set[str] | None = None) -> list[dict]:
    """Findings in one cell of student code."""
    tree = parse_cell(source)
    if tree is None:
        return [{"kind": "dynamic_code", "detail": "code that neither Python nor IPython can parse", "where": where}]
    s = _Scanner(where, module_names or set())
    s.visit(tree)
    # a line magic or shell escape turned into Python by IPython
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("system", "getoutput") \
                and "get_ipython" in ast.unparse(n.func.value):
            s.add("process", "runs a shell command (!cmd)", n)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in (
                "run_line_magic", "run_cell_magic") and n.args and isinstance(n.args[0], ast.Constant):
            magic = n.args[0].value
            if magic not in ("matplotlib", "time", "timeit", "load_ext", "autoreload", "config", "precision",
                             "pprint", "who", "whos", "history", "capture"):
                s.add("process" if magic in ("sx", "system", "bash", "sh", "script", "writefile", "run", "load")
                      else "ipython_hook", f"uses the magic %{magic}", n)
    seen = set()
    out = []
    for f in s.found:
        key = (f["kind"], f["detail"])
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out
