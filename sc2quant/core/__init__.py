"""What every verb shares: errors, terminal output, names, model sources, the one Hugging Face
loader, the artifact format, recipes, calibration/evaluation text and system facts.

Nothing in `core` imports from the verbs (`quant`, `export`, `runtime`, `evaluate`)."""
