"""``flordb_build.templates``: this folder, installed as package data (see pyproject.toml).

It holds the Make template, ``Makefile``, that ``flordb-build init --make`` copies into a project;
this file only makes the folder a package, so editable and wheel installs find it by import name.
"""
