"""Stage 2, self-supervised pretraining: the Table 3 encoder, the SimSiam loss, the two-view augmentation, the
label-free RE/SE balancing and the embedding bank, one strategy class per balance mode (``strategies``), the Ignite
trainer and monitors, the Rubik's cube baseline, and the export of the frozen 256-d features (``embed``).
"""
