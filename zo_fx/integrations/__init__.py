"""zo_fx inside other training stacks (the Hugging Face Trainer); imported on demand, never by zo_fx itself."""
