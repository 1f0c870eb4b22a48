"""The regional financial big-data system: a seeded simulator of the raw tables it exports."""
