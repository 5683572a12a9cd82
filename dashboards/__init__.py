"""advflow.dashboards."""
