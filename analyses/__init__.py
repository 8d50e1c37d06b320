"""What the toolkit shows of a trained network besides its accuracy.

    embedding   a 2-D t-SNE of features, how well the classes separate in it, saved and drawn (tsne.py)
    learned     what a network learned: its surest mistakes, Grad-CAM, first filters, nearest neighbours (visualize.py)
    report      report.html, one page gathering a run folder

``learned`` needs Captum and matplotlib, so it loads on first use (lazy_loader, as ``engine`` does): visualize.py's
--help and flag mistakes answer before them.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submodules=["learned"])
