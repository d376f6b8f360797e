"""Assets of the built-in `tiny` model and the scripts that make them."""
