"""Data sets: COVIDx-CT split files, the CNCB segmentation layout and a synthetic benchmark.

Only numpy, scipy and Pillow are used here, so these readers work in every environment.
"""
