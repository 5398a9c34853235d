"""Model parts (one file each) and their assemblies."""
