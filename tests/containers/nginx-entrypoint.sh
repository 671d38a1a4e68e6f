#!/bin/sh
# What the official nginx image's 20-envsubst-on-templates.sh does: render
# each /etc/nginx/templates/NAME.template to $NGINX_ENVSUBST_OUTPUT_DIR/NAME
# (default /etc/nginx/conf.d) with the
# environment's variables (and only those; nginx's own $variables stay).
set -eu
defined_envs=$(printf '${%s} ' $(env | cut -d= -f1))
for template in /etc/nginx/templates/*.template; do
    [ -f "$template" ] || continue
    envsubst "$defined_envs" < "$template" \
        > "${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}/$(basename "$template" .template)"
done
exec "$@"
