"""Volume I/O and preprocessing (the Grain pipelines arrive with step 4)."""
