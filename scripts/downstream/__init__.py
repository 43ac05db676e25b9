"""Stage 3, downstream evaluation: pyradiomics features, the linear-SVM protocol, the supervised baseline, and the
reports (Markdown, HTML, cluster explorer, balancing table).
"""
