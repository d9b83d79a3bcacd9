"""The shared core every style uses: config, parallel, training, check, report, models, data, errors."""
