"""Side-by-side performance harness: blip-train vs the transformers reference (run `make bench`)."""
