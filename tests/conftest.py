pytest_plugins = ["tests.services", "tests.services_pg"]
