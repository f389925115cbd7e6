"""Developer tooling that runs before or beside the services: dependency locks, installs."""
