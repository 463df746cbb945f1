"""Device drivers: I/O and parsing for one kind of device each; they import nothing from epiconsole or screens."""
