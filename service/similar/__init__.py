"""The similar-case library: an hnswlib index of diagnosed reference studies, bound
to the model that embedded them (``index``), the ``sonocase index`` commands that
build and fill it (``cli``), and the copy of labelled studies out of a PACS
(``pacs_copy``). The pipeline queries it; the reports show what it found.
"""
