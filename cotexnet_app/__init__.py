"""``cotexnet app``: CoTexNet in the browser, on trame-slicer (the optional extra ``app``).

:mod:`.launch` starts :mod:`.gateway`, which checks tokens and gives each browser session its own :mod:`.session` process (a trame
page over its own MRML scene, with the engine in a worker process); :mod:`.files` keeps every path the
page names inside the data root. Unlike the engine, this package imports slicer and vtk.
"""
