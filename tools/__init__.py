"""Developer tools of this repository (not installed with any package); see tools/README.md."""
