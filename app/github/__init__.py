"""Everything that talks to GitHub: App authentication, the API client, installations."""
