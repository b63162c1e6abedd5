"""The console: a read-only, live web page over run directories.

:mod:`~.views` picks what the page may show from the files a run writes (never
training text); :mod:`~.server` serves it (token, headers, server-sent events);
``static/`` holds the page and the vendored chart library (uPlot, MIT).
"""
