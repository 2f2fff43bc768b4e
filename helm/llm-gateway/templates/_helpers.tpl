{{/*
The chart's name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "llm-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: the release name, followed by the chart name unless
the release name already contains it.
*/}}
{{- define "llm-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
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
The gateway's config as the ConfigMap holds it: .Values.config with `listen`
and `admin_listen` set from .Values.containerPorts, and, while it names no
models, the embedded default's `mock` provider and model.
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
{{- toYaml $config }}
{{- end }}

{{/*
config.server.shutdown_grace in whole seconds, when it is written in a plain
form (a number of seconds, or digits followed by ms, s, m or h); empty for
other forms ("1m 30s"), which the grace check then skips. The gateway's
default is 30s.
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
{{- div (trimSuffix "ms" $s | atoi) 1000 }}
{{- else if regexMatch "^[0-9]+s$" $s }}
{{- trimSuffix "s" $s }}
{{- else if regexMatch "^[0-9]+m$" $s }}
{{- mul (trimSuffix "m" $s | atoi) 60 }}
{{- else if regexMatch "^[0-9]+h$" $s }}
{{- mul (trimSuffix "h" $s | atoi) 3600 }}
{{- end }}
{{- end }}

{{/*
Fails the render when the pod's termination grace period leaves the gateway
too little time to drain: it needs preStopSleepSeconds, then shutdown_grace,
then up to 5 seconds for cancelled calls to end.
*/}}
{{- define "llm-gateway.checkGrace" -}}
{{- $grace := include "llm-gateway.shutdownGraceSeconds" . }}
{{- if $grace }}
{{- $need := add (atoi $grace) 5 (int .Values.preStopSleepSeconds) }}
{{- $have := int64 .Values.terminationGracePeriodSeconds }}
{{- if le $have (int64 $need) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed config.server.shutdown_grace + preStopSleepSeconds + 5 (%d seconds)" $have (int64 $need)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Fails the render when provider keys are asked for without a Secret.
*/}}
{{- define "llm-gateway.checkProviderKeys" -}}
{{- if and .Values.providerKeys.env (not .Values.providerKeys.secretName) }}
{{- fail "providerKeys.env is set: providerKeys.secretName must name the Secret that holds the keys" }}
{{- end }}
{{- end }}
