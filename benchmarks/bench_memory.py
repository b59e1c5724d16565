"""Peak memory (RSS) of predicting a large model's parameters on the CPU, beyond the model itself.

Each model runs in a fresh child process: load the GHN, build the model (random init), then measure the
resident set size (RSS) before and the peak RSS during each phase: building the graph, and predicting
(GHN forward, decoding, writing into the model). The peak comes from the kernel's high-water mark
(``VmHWM``, reset between phases through ``/proc/self/clear_refs``), with a 5 ms sampling thread as a
cross-check. Printed: the model's parameter bytes, the peak RSS beyond the RSS before each phase, and
its ratio to the parameter bytes (the target is at most about 1.5).

    python benchmarks/bench_memory.py [--ghn PATH] [--complete] [models ...]   # default: vit_l_16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GHN = ROOT.parent / 'shared' / 'conformance' / 'ghn3_tiny_random.joblib'


def _status(key: str) -> int:
    """A ``/proc/self/status`` entry in bytes (``VmRSS``, ``VmHWM``)."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakRSS:
    """Context manager: ``start`` RSS, ``peak`` RSS (kernel high-water mark and sampled, the larger)."""

    def __enter__(self) -> PeakRSS:
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start = _status('VmRSS')
        self.sampled = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, _status('VmRSS'))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, _status('VmRSS'))
        self.peak = max(self.sampled, _status('VmHWM')) if self.hwm_reset else self.sampled


def child(name: str, ghn_path: str, complete: bool) -> dict:
    import torch

    import ghnviz

    torch.set_num_threads(1)
    ghn = ghnviz.load_ghn(ghn_path)
    torch.manual_seed(0)
    model = ghnviz.create_model(name, num_classes=ghn.num_classes)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {'model': name, 'param_bytes': param_bytes}
    with PeakRSS() as graph_mem:
        t = time.perf_counter()
        graph = ghnviz.build_graph(model, ve_cutoff=ghn.config.ve_cutoff)
        out['graph_s'] = time.perf_counter() - t
    with PeakRSS() as pred_mem:
        t = time.perf_counter()
        ghn.predict(model, graph=graph, complete=complete)
        out['predict_s'] = time.perf_counter() - t
    for phase, m in (('graph', graph_mem), ('predict', pred_mem)):
        out[f'{phase}_rss_before'] = m.start
        out[f'{phase}_peak_extra'] = m.peak - m.start
        out[f'{phase}_hwm'] = m.hwm_reset
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('models', nargs='*', default=['vit_l_16'])
    p.add_argument('--ghn', default=str(DEFAULT_GHN))
    p.add_argument('--complete', action='store_true', help='predict(complete=True)')
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ghn, args.complete)))
        return

    gib = 2**30
    print(
        f'{"model":<14} {"params GiB":>10} {"RSS GiB":>8} {"graph +GiB":>10} {"ratio":>6} '
        f'{"predict +GiB":>12} {"ratio":>6} {"graph s":>8} {"predict s":>9}'
    )
    for name in args.models:
        cmd = [sys.executable, __file__, '--child', name, '--ghn', args.ghn]
        cmd += ['--complete'] if args.complete else []
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        pb = r['param_bytes']
        print(
            f'{name:<14} {pb / gib:>10.3f} {r["graph_rss_before"] / gib:>8.3f} '
            f'{r["graph_peak_extra"] / gib:>10.3f} {r["graph_peak_extra"] / pb:>6.2f} '
            f'{r["predict_peak_extra"] / gib:>12.3f} {r["predict_peak_extra"] / pb:>6.2f} '
            f'{r["graph_s"]:>8.2f} {r["predict_s"]:>9.2f}'
        )


if __name__ == '__main__':
    main()
