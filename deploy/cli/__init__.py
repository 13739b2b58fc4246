"""The `moecluster` command line: one module per subcommand; `main` builds the parser and reports errors."""
