# This directory holds the package under test; pytest puts a conftest's directory on
# sys.path, which makes `import resilient_training` work for the tests and the ranks.
