"""The built-in job's parts: real data and models shipped in packages, loaded offline."""
