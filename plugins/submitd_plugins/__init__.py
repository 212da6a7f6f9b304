"""The built-in submitd plugins; each module is one entry point in the group ``submitd``."""
