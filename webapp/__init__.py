"""The web page: a consumer of the pipeline, beside :mod:`evaluation` and :mod:`benchmarks`.

* :mod:`webapp.app`      the Gradio page, its command line and its server (``python -m webapp``,
  ``scripts/app.sh``);
* :mod:`webapp.job`      one request without the web part: its config, its run with the warm networks,
  the progress it reports (from :mod:`pipeline.events`), the app's folder;
* :mod:`webapp.results`  how the page names and serves its files without giving out a server path.
"""
