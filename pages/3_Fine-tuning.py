"""Fine-tuning page: launch short runs from several inits in the background, watch them live, compare."""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
from pathlib import Path

import pandas as pd
import streamlit as st

from ghnviz.ui import charts, loaders, page, state
from ghnviz.ui.errors import attempt, show_error

POLL_S = 1.5  # seconds between polls of the run store while a run is active
DATASETS = ['cifar10']


def _run_label(run) -> str:
    return f'#{run.id} {run.name}'


def _launch_form(spec: state.ModelSpec, ghn_path: str | None) -> None:
    from ghnviz.finetune import INITS, FinetuneConfig
    from ghnviz.runner import launch
    from ghnviz.zoo.pasted import PastedModel, code_allowed

    st.session_state.setdefault('ft_inits', ['default', 'ghn'] if ghn_path else ['default'])
    st.session_state.setdefault('ft_data', state.default_data_path())
    with st.form('ft_form'):
        st.markdown(f'Model: **{spec.label}**')
        c = st.columns(3)
        inits = c[0].multiselect(
            'Initialisations (one run each)',
            list(INITS),
            key='ft_inits',
            help='default: PyTorch init; ghn: predicted; +orth / +noise: post-processed predictions.',
        )
        dataset = c[1].selectbox('Dataset', DATASETS, key='ft_dataset')
        data_path = c[2].text_input(
            'Dataset file or folder',
            key='ft_data',
            placeholder='cifar10-jpeg.tar.xz (empty: default location)',
        )
        c = st.columns(7)
        shots = c[0].number_input('Shots per class', 1, 5000, 10, key='ft_shots')
        steps = c[1].number_input('Steps', 1, 100_000, 20, key='ft_steps')
        lr = c[2].number_input('Learning rate', 1e-5, 1.0, 0.01, step=0.001, format='%.4f', key='ft_lr')
        batch = c[3].number_input('Batch size', 2, 1024, 32, key='ft_batch')
        eval_every = c[4].number_input(
            'Evaluate every', 0, 100_000, 10, key='ft_eval_every', help='steps (0: start and end)'
        )
        eval_limit = c[5].number_input('Test images', 10, 10_000, 200, step=10, key='ft_eval_limit')
        seed = c[6].number_input('Seed', 0, 2**31 - 1, 0, key='ft_seed')
        submitted = st.form_submit_button('Launch runs', type='primary')
    if not submitted:
        return
    if not inits:
        st.warning('Choose at least one initialisation.')
        return
    if any(INITS[i][0] for i in inits) and not ghn_path:
        show_error(
            'No GHN is loaded',
            'the ghn inits need one',
            'Load a GHN on the Home page, or use the default init only.',
        )
        return
    if not spec.is_zoo and not code_allowed():
        show_error(
            'Pasted code is switched off',
            'GHNVIZ_ALLOW_CODE=0 is set for this app',
            'Choose a torchvision or DeepNets-1M model on the Architecture page.',
        )
        return
    if data_path and not Path(data_path).expanduser().exists():
        show_error(
            'Dataset not found',
            f'{data_path} does not exist',
            'Give the path of the CIFAR-10 archive or folder.',
        )
        return
    store = loaders.default_run_store()
    launched = []
    for init in inits:
        try:
            cfg = FinetuneConfig(
                model=spec.name,
                model_code=None if spec.is_zoo else PastedModel.from_json(spec.pasted).source,
                init=init,
                ghn=ghn_path or 'default',
                dataset=dataset,
                data_path=data_path or None,
                shots=int(shots),
                steps=int(steps),
                lr=float(lr),
                batch_size=int(batch),
                eval_every=int(eval_every),
                eval_limit=int(eval_limit),
                image_size=int(spec.image_size),
                seed=int(seed),
                threads=1,
            )
            run_id = launch(store, cfg.to_dict(), name=f'{spec.name} {init}')
        except Exception as exc:  # noqa: BLE001
            show_error(f'Could not launch the {init} run', exc, 'Check the settings above.')
            continue
        launched.append(run_id)
    if launched:
        shown = list(st.session_state.get('ft_show', []))
        st.session_state['ft_show'] = shown + [r for r in launched if r not in shown]
        st.toast(f'Launched {len(launched)} run(s): ' + ', '.join(f'#{r}' for r in launched))


def _history_frame(store, runs) -> pd.DataFrame:
    rows = []
    for r in runs:
        latest = store.latest_metrics(r.id)
        acc = latest.get('test/acc', (None, None))[1]
        step = max((s for s, _ in latest.values()), default=0)
        rows.append(
            {
                'id': r.id,
                'name': r.name,
                'status': r.status,
                'model': r.config.get('model'),
                'init': r.config.get('init'),
                'step': f'{step}/{r.config.get("steps", "?")}',
                'test acc %': acc,
                'seconds': round(r.seconds, 1) if r.seconds is not None else None,
                'created': dt.datetime.fromtimestamp(r.created).strftime('%Y-%m-%d %H:%M:%S'),
            }
        )
    return pd.DataFrame(rows)


def _csv(store, ids: list[int]) -> bytes:
    frames = []
    for run_id in ids:
        run = store.get_run(run_id)
        f = store.metrics_frame(run_id)
        f.insert(1, 'name', run.name)
        f.insert(2, 'init', run.config.get('init'))
        frames.append(f)
    buf = io.StringIO()
    (pd.concat(frames) if frames else pd.DataFrame()).to_csv(buf, index=False)
    return buf.getvalue().encode()


def _runs_panel() -> None:
    from ghnviz import runner

    store = loaders.default_run_store()
    attempt('Could not check the background runs', runner.reconcile, store)
    runs = store.list_runs()
    active = [r for r in runs if r.active]
    for r in active:
        latest = store.latest_metrics(r.id)
        step = max((s for s, _ in latest.values()), default=0)
        total = max(int(r.config.get('steps') or 1), 1)
        c1, c2 = st.columns([5, 1])
        c1.progress(min(step / total, 1.0), text=f'{_run_label(r)}: {r.status}, step {step}/{total}')
        if c2.button('Cancel', key=f'ft_cancel_{r.id}'):
            status = attempt('Could not cancel the run', runner.cancel, store, r.id, wait=False)
            st.toast(f'Run #{r.id}: cancel requested ({status})')
    if not runs:
        st.info('No runs yet: configure and launch some above.')
    else:
        by_id = {r.id: r for r in runs}
        st.session_state['ft_show'] = [
            i for i in st.session_state.get('ft_show', [r.id for r in runs[:4]]) if i in by_id
        ]
        shown = st.multiselect(
            'Runs to plot and compare', list(by_id), key='ft_show', format_func=lambda i: _run_label(by_id[i])
        )
        frames = {_run_label(by_id[i]): store.metrics_frame(i) for i in shown}
        c1, c2 = st.columns(2)
        c1.plotly_chart(
            charts.curves_figure(frames, 'train/loss', 'Training loss', 'loss'), key='ft_loss_chart'
        )
        c2.plotly_chart(
            charts.curves_figure(frames, 'test/acc', 'Test accuracy', 'top-1 %'), key='ft_acc_chart'
        )
        st.markdown('**Run history**')
        st.dataframe(_history_frame(store, runs), hide_index=True, key='ft_history')
        failed = [r for r in runs if r.status == 'failed' and r.id in shown]
        for r in failed:
            with st.expander(f'Why {_run_label(r)} failed'):
                st.code((r.error or 'no error text')[-3000:])
        st.download_button(
            'Export the plotted runs as CSV',
            _csv(store, shown),
            'ghnviz-runs.csv',
            mime='text/csv',
            key='ft_csv',
            disabled=not shown,
            on_click='ignore',
        )
    was_active = st.session_state.get('ft_was_active', False)
    st.session_state['ft_was_active'] = bool(active)
    if was_active != bool(active):
        st.rerun(scope='app')  # start or stop polling


def main() -> None:
    st.title('Fine-tuning')
    spec = state.current_model()
    if importlib.util.find_spec('ghnviz.data') is None:
        show_error(
            'Fine-tuning is not available in this build',
            'the dataset module ghnviz.data is missing',
            'Install the complete ghnviz package.',
        )
        st.stop()
    ghn, err = loaders.current_ghn()
    ghn_path = None
    if ghn is not None:
        ghn_path = attempt('Could not locate the GHN file', loaders.ghn_resolved_path, state.ghn_source())
    else:
        st.info('No GHN is loaded: only the default init can be fine-tuned (load one on the Home page).')
    if not spec.is_zoo:
        st.caption(
            f'Pasted model: each run executes its code again in the run process and trains it as written '
            f'(no stem adaptation) on {spec.image_size}x{spec.image_size} images.'
        )
    _launch_form(spec, ghn_path)
    st.subheader('Runs')
    st.session_state.setdefault('ft_was_active', False)
    st.fragment(_runs_panel, run_every=POLL_S if st.session_state['ft_was_active'] else None)()


page.run('Fine-tuning', main)
