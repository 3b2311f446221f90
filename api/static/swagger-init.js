// Swagger UI for AIQ: the spec from this server, the Authorize dialog's OAuth2 password flow kept across
// reloads. A file rather than an inline script, so the page's CSP can forbid inline scripts.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  showExtensions: true,
  displayRequestDuration: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
