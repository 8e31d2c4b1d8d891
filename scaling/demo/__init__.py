"""Generated data for the offline demo study, written in the real datasets' on-disk formats.

:func:`scaling.demo.synthetic.write_synthetic_chexpert` writes a CheXpert-small-layout dataset (two acquisition
sites: the in-distribution one and a shifted one for OOD evaluation) and
:func:`scaling.demo.synthetic.write_fractal_imagefolder` formula-driven pretraining images. Nothing here is read
by the dataset loaders: the demo goes through the same loader code as real data.
"""
