{{/*
The chart's name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "llm-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: the release name, followed by the chart name unless
the release name already contains it. Kept to 54 characters so that
"-headless" still fits a DNS label.
*/}}
{{- define "llm-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "llm-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "llm-gateway.labels" -}}
helm.sh/chart: {{ include "llm-gateway.chart" . }}
{{ include "llm-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the gateway's pods.
*/}}
{{- define "llm-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the pods run as.
*/}}
{{- define "llm-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Where the pod mounts what it reads: sibling directories, since a mount
inside a ConfigMap or Secret volume (read-only) cannot be created.
*/}}
{{- define "llm-gateway.configDir" -}}/etc/llm-gateway/config{{- end }}
{{- define "llm-gateway.tlsDir" -}}/etc/llm-gateway/tls{{- end }}
{{- define "llm-gateway.clientCaDir" -}}/etc/llm-gateway/client-ca{{- end }}

{{/*
The gateway's config as the ConfigMap holds it: .Values.config with the
listen addresses set from .Values.containerPorts, `server.tls` from
.Values.tls, and, while it names no models, the embedded default's `mock`
provider and model.
*/}}
{{- define "llm-gateway.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- if not $config.models }}
{{- $providers := $config.providers | default dict }}
{{- if not (hasKey $providers "mock") }}
{{- $_ := set $providers "mock" (dict "kind" "mock") }}
{{- end }}
{{- $_ := set $config "providers" $providers }}
{{- $_ = set $config "models" (dict "mock" (dict "targets" (list (dict "provider" "mock" "model" "mock")))) }}
{{- end }}
{{- $_ := set $config "listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.grpc)) }}
{{- $_ = set $config "admin_listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.admin)) }}
{{- if .Values.http.enabled }}
{{- $_ = set $config "http_listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.http)) }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $server := $config.server | default dict }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" (include "llm-gateway.tlsDir" .)) "key_file" (printf "%s/tls.key" (include "llm-gateway.tlsDir" .)) "reload_interval" .Values.tls.reloadInterval }}
{{- if .Values.tls.clientCA.enabled }}
{{- $_ = set $tls "client_ca_file" (printf "%s/%s" (include "llm-gateway.clientCaDir" .) .Values.tls.clientCA.key) }}
{{- end }}
{{- $_ = set $server "tls" $tls }}
{{- $_ = set $config "server" $server }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
config.server.shutdown_grace in whole seconds (rounded up), when it is written
in a plain form (a number of seconds, or digits followed by ms, s, m or h);
empty for other forms ("1m 30s"), which the grace check then skips. The
gateway's default is 30s.
*/}}
{{- define "llm-gateway.shutdownGraceSeconds" -}}
{{- $server := (.Values.config | default dict).server | default dict }}
{{- $grace := "30s" }}
{{- if hasKey $server "shutdown_grace" }}
{{- $grace = $server.shutdown_grace }}
{{- end }}
{{- $s := toString $grace | trim }}
{{- if regexMatch "^[0-9]+$" $s }}
{{- $s }}
{{- else if regexMatch "^[0-9]+ms$" $s }}
{{- div (add (trimSuffix "ms" $s | atoi) 999) 1000 }}
{{- else if regexMatch "^[0-9]+s$" $s }}
{{- trimSuffix "s" $s }}
{{- else if regexMatch "^[0-9]+m$" $s }}
{{- mul (trimSuffix "m" $s | atoi) 60 }}
{{- else if regexMatch "^[0-9]+h$" $s }}
{{- mul (trimSuffix "h" $s | atoi) 3600 }}
{{- end }}
{{- end }}

{{/*
The name of the Secret the pods read their secret variables from.
*/}}
{{- define "llm-gateway.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "llm-gateway.fullname" .) }}
{{- end }}

{{/*
Whether the pods read any variable from a Secret, and whether the chart makes it.
*/}}
{{- define "llm-gateway.usesSecret" -}}
{{- if or .Values.secrets.providerKeys .Values.secrets.redisPasswordKey }}true{{ end }}
{{- end }}
{{- define "llm-gateway.makesSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.values (include "llm-gateway.usesSecret" .)) }}true{{ end }}
{{- end }}

{{/*
The environment variable the Redis password goes in: config.redis.password_env,
REDIS_PASSWORD when unset.
*/}}
{{- define "llm-gateway.redisPasswordEnv" -}}
{{- ((.Values.config | default dict).redis | default dict).password_env | default "REDIS_PASSWORD" }}
{{- end }}

{{/*
Stops the render on values that would make a pod that cannot work: a grace
period too short for the drain, secrets asked for without a source, TLS
without a Secret, a PodDisruptionBudget with both or neither bound.
*/}}
{{- define "llm-gateway.checks" -}}
{{- $grace := include "llm-gateway.shutdownGraceSeconds" . }}
{{- if $grace }}
{{- $need := add (atoi $grace) 6 (int .Values.preStopSleepSeconds) }}
{{- $have := int64 .Values.terminationGracePeriodSeconds }}
{{- if le $have (int64 $need) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + config.server.shutdown_grace + 6 (%d seconds)" $have (int64 $need)) }}
{{- end }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- range $env, $key := .Values.secrets.providerKeys }}
{{- if not (hasKey $.Values.secrets.values $key) }}
{{- fail (printf "secrets.providerKeys.%s names the key %q: without secrets.existingSecret, secrets.values must hold it" $env $key) }}
{{- end }}
{{- end }}
{{- with .Values.secrets.redisPasswordKey }}
{{- if not (hasKey $.Values.secrets.values .) }}
{{- fail (printf "secrets.redisPasswordKey names the key %q: without secrets.existingSecret, secrets.values must hold it" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled: tls.secretName must name the kubernetes.io/tls Secret holding tls.crt and tls.key" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled needs tls.enabled" }}
{{- end }}
{{- if .Values.podDisruptionBudget.enabled }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- $min := toString $pdb.minAvailable }}
{{- $max := toString $pdb.maxUnavailable }}
{{- if or (and (ne $min "") (ne $max "")) (and (eq $min "") (eq $max "")) }}
{{- fail "podDisruptionBudget: give exactly one of minAvailable and maxUnavailable (leave the other \"\")" }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetMemoryUtilizationPercentage)) }}
{{- fail "autoscaling.enabled: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- end }}
