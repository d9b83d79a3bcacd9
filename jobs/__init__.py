"""The command and its launching: cli/ (parser, commands), plan/, launch/ (executors, watching), validate/."""
