"""The application above the jdiff library: what train.py and sample.py run on the embedded data.

The captioned-shapes set and its detector-based evaluation, the training recipe and its stages,
sample.py's batch loop and prompt files, and process tweaks (XLA flags, huge pages). The library
(`jdiff` outside this folder) never imports from here.
"""
