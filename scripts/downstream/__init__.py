"""Stage 3, downstream evaluation: pyradiomics features (``radiomics``), the one protocol (``protocol``: folds, label
fractions, C, fit, predict; ``metrics``: scikit-learn metrics and their aggregation) used by the SVM rows, the
supervised baseline (``supervised``) and the saved SVM (``svm_model``); ``evaluation`` runs it on a cohort's feature
tables into a results object, which the reports only render (``report``, ``report_html``, ``report_tables``, cluster
explorer, balancing table).
"""
