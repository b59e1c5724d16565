"""Page frame shared by every page: page config, sidebar navigation and status, a last-resort error net.

The app uses Streamlit's ``pages/`` auto-discovery (``app.py`` is the home page); the generated
navigation is hidden (``client.showSidebarNavigation = false`` in ``.streamlit/config.toml``) and
replaced by :func:`sidebar`, which labels the pages properly.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import streamlit as st

from . import loaders, state
from .errors import show_error

# (script path relative to app.py, label, icon)
PAGES: tuple[tuple[str, str, str], ...] = (
    ('app.py', 'Home', ':material/home:'),
    ('pages/1_Architecture.py', 'Architecture', ':material/account_tree:'),
    ('pages/2_Parameters.py', 'Parameters', ':material/tune:'),
    ('pages/3_Fine-tuning.py', 'Fine-tuning', ':material/monitoring:'),
    ('pages/4_Embeddings.py', 'Embeddings', ':material/scatter_plot:'),
)


THREADS_ENV = 'GHNVIZ_THREADS'
_threads_set = False


def configure_threads() -> None:
    """Torch CPU threads of the app process, once: ``$GHNVIZ_THREADS``, else half the cores.

    Several sessions share the process and the machine usually runs background runs too; a full
    thread pool per computation then oversubscribes the cores, which slows the statistics of a
    ResNet-50 several-fold on a busy machine.
    """
    global _threads_set
    if _threads_set:
        return
    import torch

    wanted = os.environ.get(THREADS_ENV, '').strip()
    torch.set_num_threads(max(1, int(wanted) if wanted else (os.cpu_count() or 2) // 2))
    _threads_set = True


def sidebar() -> None:
    """Page links, then which GHN and which model the session works on."""
    with st.sidebar:
        for path, label, icon in PAGES:
            st.page_link(path, label=label, icon=icon)
        st.divider()
        ghn, _ = loaders.current_ghn()
        source = state.ghn_source()
        name = 'shipped default' if source == 'default' else source.replace('\\', '/').rsplit('/', 1)[-1]
        if ghn is not None:
            arch = getattr(ghn, 'arch', '?')
            st.caption(f'GHN: **{name}** ({arch}, {ghn.num_classes} classes, {ghn.device})')
        else:
            st.caption(f'GHN: **not loaded** ({name}); choose one on the Home page')
        st.caption(f'Model: **{state.current_model().label}**')


def run(title: str, body: Callable[[], None]) -> None:
    """Set the page up and run ``body``; an exception it lets through becomes an ``st.error``."""
    st.set_page_config(page_title=f'{title} · ghnviz', page_icon='🕸️', layout='wide')
    configure_threads()
    sidebar()
    try:
        body()
    except Exception as exc:  # noqa: BLE001 - last resort: a message, never a traceback
        show_error(f'The {title} page failed', exc, 'Try again, or choose another model or GHN.')
