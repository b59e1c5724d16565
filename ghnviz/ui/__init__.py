"""Streamlit helpers shared by the app's pages (the only part of ghnviz that imports streamlit).

* :mod:`.state`: settings from the environment, the chosen GHN and model kept in session state;
* :mod:`.loaders`: cached loaders (GHN, graphs, run store) and fresh model construction;
* :mod:`.errors`: errors shown as ``st.error`` with what to do, never a traceback;
* :mod:`.charts`: plotly figures (no streamlit calls).
"""
