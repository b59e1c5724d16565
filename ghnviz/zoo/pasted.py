"""Models from pasted source code: checked in a child process with limits, rebuilt only if allowed.

Trust model. Pasted code is Python: whoever can paste it can do anything the process running it
can do. ghnviz therefore treats it as the app user's own code, exactly as if they had typed it
into a Python prompt on the machine that serves the app, and offers two protections:

1. **Checking runs in a child process** (:func:`check_pasted`): a fresh ``python -m
   ghnviz.zoo.pasted`` with a CPU-time limit, an address-space limit above what torch itself
   needs, a file-size limit, a wall-clock timeout (the child is killed) and a scratch working
   folder. It compiles the code, executes it, finds the ``nn.Module`` class, builds it, runs a
   forward pass on a random batch of the chosen input size and builds its computation graph.
   What comes back is plain JSON (the class name, sizes, the graph as data): nothing the parent
   deserialises can run code. Infinite loops, huge allocations, crashes and wrong input sizes
   therefore end in a clear error instead of hanging or killing the app, and the architecture
   can be drawn from the child's graph without the code ever running in the app's process.
2. **Rebuilding in the app's process** (:func:`build_pasted`) is needed to predict, measure or
   fine-tune the model; it executes the *checked* source again, in a fresh namespace, and is
   refused when ``GHNVIZ_ALLOW_CODE=0``. The limits do not apply there: the check is a guard
   against mistakes, not a sandbox against malice.

So: on a machine where people you do not trust can reach the app, set ``GHNVIZ_ALLOW_CODE=0``
(pasting is then switched off entirely, checking included).

Protocol of the child: a JSON request on standard input (``source``, ``class_name``,
``num_classes``, ``input_size``, ``memory_mb``, ``cpu_s``), one JSON object on standard output
(``ok`` true with the facts, or ``ok`` false with ``kind`` and ``message``). Anything the pasted
code prints goes to standard error.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ALLOW_ENV = 'GHNVIZ_ALLOW_CODE'
TIMEOUT_ENV = 'GHNVIZ_CODE_TIMEOUT'
MEMORY_ENV = 'GHNVIZ_CODE_MEMORY'
_OFF = {'0', 'false', 'no', 'off'}
_NAMESPACE = '__ghnviz_pasted__'  # module name the pasted code runs as (its classes' __module__)

# kind -> what the user should do about it (appended to the specific message)
HINTS: dict[str, str] = {
    'disabled': f'pasting code is switched off on this server ({ALLOW_ENV}=0).',
    'syntax': 'fix the syntax error and check again.',
    'import': 'install the missing package on the server, or remove the import.',
    'exec': 'the code raised an error while it was being executed (module level).',
    'no_module': 'define a subclass of torch.nn.Module (its constructor may take num_classes).',
    'constructor': 'the class must be constructible as Cls() or Cls(num_classes=...).',
    'forward': 'check the input size: the model must accept a (batch, channels, height, width) tensor of it.',
    'output': 'forward() must return a (batch, classes) tensor of logits.',
    'graph': 'the model ran but its computation graph could not be traced.',
    'timeout': 'the code ran too long; make the model smaller or fix the endless loop.',
    'memory': 'the code needed more memory than allowed; make the model smaller.',
    'crash': 'the checking process ended abnormally.',
}


class PastedCodeError(ValueError):
    """Pasted code cannot be used; ``kind`` is a key of :data:`HINTS`."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        self.message = message
        super().__init__(f'{message} ({HINTS.get(kind, "")})' if HINTS.get(kind) else message)


@dataclass
class PastedLimits:
    """Limits of the checking process."""

    timeout_s: float = 90.0  # wall clock for the whole check, torch import included (a few seconds)
    cpu_s: int = 60  # CPU seconds of the pasted code (limit set after torch is imported)
    memory_mb: int = 2048  # address space the pasted code may add on top of the interpreter's
    file_mb: int = 16  # largest file the code may write

    @classmethod
    def from_env(cls) -> PastedLimits:
        """The defaults, overridden by ``GHNVIZ_CODE_TIMEOUT`` (seconds; wall clock and CPU) and
        ``GHNVIZ_CODE_MEMORY`` (MB)."""
        limits = cls()
        timeout = os.environ.get(TIMEOUT_ENV, '').strip()
        if timeout:
            limits.timeout_s = float(timeout)
            limits.cpu_s = max(1, int(float(timeout)))
        memory = os.environ.get(MEMORY_ENV, '').strip()
        if memory:
            limits.memory_mb = int(memory)
        return limits


@dataclass
class PastedModel:
    """A checked pasted model: its source and what the check found."""

    source: str
    class_name: str
    num_classes: int
    input_size: tuple[int, int, int]
    n_params: int
    output_shape: tuple[int, ...]
    graph: dict  # ComputationGraph.to_dict() of the model, built in the child
    seconds: float  # wall time of the check
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PastedModel:
        d = json.loads(text)
        d['input_size'] = tuple(d['input_size'])
        d['output_shape'] = tuple(d['output_shape'])
        return cls(**d)

    def computation_graph(self):
        """The graph the child built (no code runs to get it)."""
        from ghnviz.graph.core import ComputationGraph

        return ComputationGraph.from_dict(self.graph)


def code_allowed() -> bool:
    """Whether pasted code may run here (``GHNVIZ_ALLOW_CODE`` is not 0/false/no/off)."""
    return os.environ.get(ALLOW_ENV, '1').strip().lower() not in _OFF


# ------------------------------------------------------------------------------------ parent side
def check_pasted(
    source: str,
    num_classes: int = 10,
    input_size: tuple[int, int, int] = (3, 32, 32),
    class_name: str | None = None,
    limits: PastedLimits | None = None,
) -> PastedModel:
    """Check pasted code in a child process (see the module docstring).

    Args:
        source: Python source defining an ``nn.Module`` subclass.
        num_classes: passed to the constructor when it takes ``num_classes``.
        input_size: ``(C, H, W)`` of the test batch and of the graph's tracing input.
        class_name: the class to build; None picks the last ``nn.Module`` subclass defined.
        limits: time and memory limits.

    Raises:
        PastedCodeError: with ``kind`` saying what went wrong.
    """
    if not code_allowed():
        raise PastedCodeError('disabled', 'pasted code is disabled')
    if not source or not source.strip():
        raise PastedCodeError('no_module', 'the code is empty')
    try:  # compiling runs nothing: syntax errors are reported without starting a process
        compile(source, '<pasted>', 'exec')
    except SyntaxError as e:
        where = f'line {e.lineno}' + (f', column {e.offset}' if e.offset else '')
        raise PastedCodeError('syntax', f'syntax error at {where}: {e.msg}') from None
    except ValueError as e:  # null bytes
        raise PastedCodeError('syntax', str(e)) from None
    limits = limits or PastedLimits.from_env()
    request = {
        'source': source,
        'class_name': class_name or None,
        'num_classes': int(num_classes),
        'input_size': [int(s) for s in input_size],
        'cpu_s': int(limits.cpu_s),
        'memory_mb': int(limits.memory_mb),
        'file_mb': int(limits.file_mb),
    }
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = {
        'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
        'PYTHONPATH': pkg_root,
        'OMP_NUM_THREADS': '1',
        'MKL_NUM_THREADS': '1',
        'PYTHONDONTWRITEBYTECODE': '1',
        'PYTHONUNBUFFERED': '1',
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='ghnviz-pasted-') as tmp:
        env['HOME'] = tmp
        env['TMPDIR'] = tmp
        proc = subprocess.Popen(
            [sys.executable, '-m', 'ghnviz.zoo.pasted'],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp,
            env=env,
            start_new_session=True,  # its own process group: killed with everything it started
        )
        try:
            out, err = proc.communicate(json.dumps(request).encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise PastedCodeError('timeout', f'no answer within {limits.timeout_s:g} s') from None
    seconds = time.perf_counter() - t0
    reply = _parse_reply(out)
    if reply is None:
        raise _abnormal_end(proc.returncode, err.decode(errors='replace'), limits)
    if not reply.get('ok'):
        raise PastedCodeError(reply.get('kind', 'crash'), reply.get('message', 'unknown error'))
    return PastedModel(
        source=source,
        class_name=reply['class_name'],
        num_classes=int(num_classes),
        input_size=tuple(int(s) for s in input_size),
        n_params=int(reply['n_params']),
        output_shape=tuple(reply['output_shape']),
        graph=reply['graph'],
        seconds=seconds,
        warnings=list(reply.get('warnings', [])),
    )


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _parse_reply(out: bytes) -> dict | None:
    lines = [line for line in out.decode(errors='replace').splitlines() if line.strip()]
    if not lines:
        return None
    try:
        reply = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return reply if isinstance(reply, dict) else None


def _abnormal_end(code: int | None, stderr: str, limits: PastedLimits) -> PastedCodeError:
    import signal

    tail = '\n'.join(stderr.strip().splitlines()[-3:])
    if code is not None and code < 0:
        sig = -code
        if sig == signal.SIGXCPU:
            return PastedCodeError('timeout', f'the code used more than {limits.cpu_s} s of CPU time')
        if sig == signal.SIGKILL:
            return PastedCodeError('memory', 'the checking process was killed (out of memory?)')
        name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
        return PastedCodeError('crash', f'the checking process died of signal {name}')
    if 'MemoryError' in stderr or "can't allocate memory" in stderr:
        return PastedCodeError('memory', f'the code ran out of memory (limit {limits.memory_mb} MB)')
    return PastedCodeError(
        'crash', f'the checking process ended with exit code {code}: {tail or "no output"}'
    )


def build_pasted(pasted: PastedModel):
    """Build a checked pasted model in this process (refused when pasting is switched off).

    The model gets ``expected_input_sz = input_size``, so graphs are traced at the checked size.
    """
    if not code_allowed():
        raise PastedCodeError('disabled', 'pasted code is disabled')
    namespace = _execute(pasted.source)
    cls = namespace.get(pasted.class_name)
    if not isinstance(cls, type):
        raise PastedCodeError('no_module', f'class {pasted.class_name!r} is not defined by the code')
    model = _construct(cls, pasted.num_classes)
    model.expected_input_sz = tuple(pasted.input_size)
    return model


def _execute(source: str) -> dict[str, Any]:
    """Compile and run ``source`` in a fresh module namespace; PastedCodeError on failure."""
    try:
        code = compile(source, '<pasted>', 'exec')
    except SyntaxError as e:
        where = f'line {e.lineno}' + (f', column {e.offset}' if e.offset else '')
        raise PastedCodeError('syntax', f'syntax error at {where}: {e.msg}') from None
    namespace: dict[str, Any] = {'__name__': _NAMESPACE, '__builtins__': __builtins__}
    try:
        exec(code, namespace)  # noqa: S102 - the point of this module; see the trust model above
    except ImportError as e:
        missing = getattr(e, 'name', None)
        what = f'module {missing!r} is not installed' if missing else str(e)
        raise PastedCodeError('import', f'import failed: {what}') from None
    except Exception as e:
        if _is_oom(e):
            raise PastedCodeError('memory', 'the code ran out of memory while executing') from None
        raise PastedCodeError('exec', f'{type(e).__name__} at module level: {_short(e)}') from None
    return namespace


def _module_classes(namespace: dict[str, Any]) -> list[type]:
    from torch import nn

    return [
        v
        for v in namespace.values()
        if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == _NAMESPACE
    ]


def _construct(cls: type, num_classes: int):
    from torch import nn

    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    takes = 'num_classes' in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        model = cls(num_classes=num_classes) if takes else cls()
    except Exception as e:
        if _is_oom(e):
            raise PastedCodeError('memory', f'{cls.__name__}() ran out of memory') from None
        raise PastedCodeError(
            'constructor', f'{cls.__name__}() failed: {type(e).__name__}: {_short(e)}'
        ) from None
    if not isinstance(model, nn.Module):
        raise PastedCodeError('constructor', f'{cls.__name__}() did not return an nn.Module')
    return model


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "can't allocate memory" in text or 'out of memory' in text


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


# ------------------------------------------------------------------------------------- child side
def _set_limits(cpu_s: int, memory_mb: int, file_mb: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
    try:
        with open('/proc/self/status') as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmSize:'))
    except (OSError, StopIteration, ValueError):
        vm = 0
    if vm:  # torch alone reserves gigabytes of address space: limit what comes on top of it
        limit = vm + (memory_mb << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _check(request: dict, apply_limits: bool = True) -> dict:
    """What the child does: returns the reply (``ok`` and facts, or ``ok`` false with kind/message).

    ``apply_limits=False`` skips the resource limits (they would bind the calling process for good);
    only the child process itself should call it with limits.
    """
    import torch

    if apply_limits:
        torch.set_num_threads(1)
        _set_limits(request['cpu_s'], request['memory_mb'], request['file_mb'])
    num_classes = int(request['num_classes'])
    size = tuple(int(s) for s in request['input_size'])
    try:
        namespace = _execute(request['source'])
        classes = _module_classes(namespace)
        name = request.get('class_name')
        if name:
            found = [c for c in classes if c.__name__ == name]
            if not found:
                have = ', '.join(c.__name__ for c in classes) or 'none'
                raise PastedCodeError('no_module', f'no nn.Module subclass named {name!r} (defined: {have})')
            cls = found[0]
        elif classes:
            cls = classes[-1]
        else:
            raise PastedCodeError('no_module', 'the code defines no subclass of torch.nn.Module')
        model = _construct(cls, num_classes)
        n_params = sum(p.numel() for p in model.parameters())
        if n_params == 0:
            raise PastedCodeError('constructor', f'{cls.__name__} has no parameters to predict')
        model.eval()
        x = torch.randn(2, *size)  # (2, C, H, W)
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as e:
            if _is_oom(e):
                raise PastedCodeError('memory', 'the forward pass ran out of memory') from None
            raise PastedCodeError(
                'forward', f'forward failed on a {tuple(x.shape)} input: {type(e).__name__}: {_short(e)}'
            ) from None
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise PastedCodeError('output', f'forward returned {got} for a batch of 2; expected (2, classes)')
        warnings = []
        if out.shape[1] != num_classes:
            warnings.append(
                f'the model has {out.shape[1]} outputs but the GHN predicts {num_classes} classes; '
                'its classifier will not be predicted'
            )
        model.expected_input_sz = size
        from ghnviz.graph.build import build_graph

        try:
            graph = build_graph(model, input_size=size)
        except Exception as e:
            raise PastedCodeError('graph', f'{type(e).__name__}: {_short(e)}') from None
        return {
            'ok': True,
            'class_name': cls.__name__,
            'n_params': int(n_params),
            'output_shape': list(out.shape),
            'graph': graph.to_dict(virtual=True),
            'warnings': warnings,
        }
    except PastedCodeError as e:
        return {'ok': False, 'kind': e.kind, 'message': e.message}


def main() -> int:
    """Entry point of the checking process (``python -m ghnviz.zoo.pasted``)."""
    reply_fd = os.dup(1)  # the reply channel; the pasted code's prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    request = json.loads(sys.stdin.read())
    try:
        reply = _check(request)
    except MemoryError:
        reply = {'ok': False, 'kind': 'memory', 'message': 'the code ran out of memory'}
    except BaseException as e:  # noqa: BLE001 - report anything, never a traceback on the reply channel
        reply = {'ok': False, 'kind': 'crash', 'message': f'{type(e).__name__}: {_short(e)}'}
    with os.fdopen(reply_fd, 'w') as f:
        f.write(json.dumps(reply) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
