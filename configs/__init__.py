"""Recipes. Installed as `lm.configs`, so a recipe imports the schema with
`from lm.configs import base` from any working directory."""
