"""Stage 1, data: cohorts on disk (builders, datalists and their validation) and the ROI preprocessing.

``build_cohort`` is the cohort command line; ``transforms`` holds the MONAI transforms the configs chain (tumour and
lung boxes, masks); ``roi_loader`` runs that preprocessing in radiomics worker processes.
"""
