"""Code of the siam3d-radiomics MONAI Label app (MONAI Label puts the app folder on sys.path, so this is ``lib``)."""
