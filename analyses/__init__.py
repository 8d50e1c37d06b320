"""What the toolkit shows of a trained network besides its accuracy.

embedding   a 2-D t-SNE of features, how well the classes separate in it, saved and drawn (tsne.py)
"""
