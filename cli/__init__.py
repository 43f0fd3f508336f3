"""minrr's command-line front end: one module per subcommand, no math here."""
