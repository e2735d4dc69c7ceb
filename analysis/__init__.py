"""Turn sweep directories into result tables and plots (see analysis/make_tables.py)."""
