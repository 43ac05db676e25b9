"""Real cohorts -> validated datalists: BraTS (2018-2021 layouts) and NSCLC-Radiomics, plus the cohort summary.

One module per concept: ``common`` (what the builders share), ``brats``, ``nsclc``, ``summary``; this package
re-exports their public names, so ``scripts.data.cohorts.build_brats_datalist`` and the profiles' references work.

A researcher arrives with a download folder; one call turns it into a datalist the bundle can train on and says
exactly which cases were left out and why. Nothing is dropped silently: every case that cannot be used is
recorded in the datalist's ``"excluded"`` list as ``{"id", "reason"}`` (missing modality or mask file, no grade or
stage, an unparseable or out-of-scope stage, a duplicate id, a file that fails validation...), and the summary
writes it as a CSV next to the datalist.

BraTS (``build_brats_datalist``)
    one folder per case, ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (or ``.nii``; 2023 names t2f/t1n/t1c/t2w
    are accepted as aliases), anywhere under the root (2018/2019 put them under ``HGG/`` and ``LGG/``). Grades
    come from a CSV (``name_mapping.csv`` style: an id column, found automatically as the column whose values
    match the most case folders, and a ``Grade`` column) or, without one, from an ``HGG``/``LGG`` parent folder;
    ``grade_map`` turns them into labels (HGG -> 1, LGG -> 0). The image is one modality or several as channels;
    the mask is the whole tumour (the segmentation as is: every non-zero label) unless ``mask_labels`` picks
    labels, in which case a derived mask is written. ``centre`` is read from the case name or, for 2020/2021
    names, from the older ids in the same CSV row (CBICA, TCIA01..13 -> TCIA, TMC; other BraTS 2017-2019 names,
    e.g. the 2013 cases, -> "others"; nothing to go on -> "unknown"), so the paper's Table 1 can be reproduced.

NSCLC-Radiomics (``build_nsclc_datalist``)
    CT per patient as NIfTI/NRRD (used in place), MHA/MHD (converted) or a DICOM series folder (read with
    SimpleITK's ImageSeriesReader and converted to NIfTI once); GTV masks as NIfTI/NRRD/MHA, flat
    (``<id>.nii.gz``, ``<id>_gtv.nii.gz``) or in a per-patient folder (``<id>/mask_GTV-1.nii.gz``, picked by
    ``mask_pattern``). RTSTRUCT/SEG masks are not read: no DICOM-RT library is part of the bundle's environment,
    so the error says to convert the GTV to NIfTI/NRRD first. ``Overall.Stage`` is parsed leniently (see
    ``parse_stage``) into I/II/III -> 1/2/3; stage IV, a missing stage ("NA", "") and anything unparseable are
    excluded with the raw value in the reason (the paper used I/II/III and excluded two patients without one).

Paths in the datalist are relative to the datalist file when the file lies under its folder, absolute otherwise.
The datalist is written last and atomically, after the optional per-case validation (``validate_items``: files
readable, image and mask on the same grid, mask not empty, no NaN), so it never points at a case that fails.
"""

from scripts.data.cohorts.brats import build_brats_datalist, centre_of, find_case_folders, modality_file, read_grades
from scripts.data.cohorts.common import (
    BRATS_GRADE_MAP,
    CENTRES,
    CONVERT_EXT,
    DICOM_EXT,
    DIRECT_EXT,
    MISSING,
    MODALITIES,
    MODALITY_ALIASES,
    NIFTI_EXT,
    NSCLC_LABEL_MAP,
    NSCLC_STAGE_MAP,
    PROGRESS_EVERY,
    Excluded,
    find_column,
    read_table,
)
from scripts.data.cohorts.nsclc import (
    _keeps_locale,  # noqa: F401 (tests decorate with it)
    build_nsclc_datalist,
    dicom_series,
    parse_stage,
    read_dicom_ct,
)
from scripts.data.cohorts.summary import (
    cohort_table,
    image_channels,
    markdown_table,
    profile_datalist,
    summarise,
    summary_paths,
    write_summary,
)

__all__ = [
    "BRATS_GRADE_MAP",
    "CENTRES",
    "CONVERT_EXT",
    "DICOM_EXT",
    "DIRECT_EXT",
    "Excluded",
    "MISSING",
    "MODALITIES",
    "MODALITY_ALIASES",
    "NIFTI_EXT",
    "NSCLC_LABEL_MAP",
    "NSCLC_STAGE_MAP",
    "PROGRESS_EVERY",
    "build_brats_datalist",
    "build_nsclc_datalist",
    "centre_of",
    "cohort_table",
    "dicom_series",
    "find_case_folders",
    "find_column",
    "image_channels",
    "markdown_table",
    "modality_file",
    "parse_stage",
    "profile_datalist",
    "read_dicom_ct",
    "read_grades",
    "read_table",
    "summarise",
    "summary_paths",
    "write_summary",
]
