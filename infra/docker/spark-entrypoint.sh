#!/usr/bin/env bash
# Container entrypoint of the onerec-prod image.
#
# Spark on Kubernetes starts driver and executor pods from spark.kubernetes.container.image with
# the arguments "driver ..." or "executor ..." and a set of SPARK_* environment variables; this
# script turns those into the JVM / spark-submit command lines (the same protocol as the
# entrypoint of Spark's reference images, written for pyspark installed by pip).
# Any other command (onerec-prod, mlflow, airflow, bash, ...) is executed as given.
set -euo pipefail

spark_classpath() {
  : "${SPARK_HOME:?SPARK_HOME must point at the pyspark installation}"
  local cp="${SPARK_HOME}/jars/*"
  [ -n "${SPARK_CLASSPATH:-}" ] && cp="${SPARK_CLASSPATH}:${cp}"
  [ -n "${SPARK_CONF_DIR:-}" ] && cp="${SPARK_CONF_DIR}:${cp}"
  [ -n "${SPARK_DIST_CLASSPATH:-}" ] && cp="${cp}:${SPARK_DIST_CLASSPATH}"
  echo "${cp}"
}

case "${1:-}" in
  driver)
    shift
    : "${SPARK_HOME:?SPARK_HOME must point at the pyspark installation}"
    exec "${SPARK_HOME}/bin/spark-submit" \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" \
      --conf "spark.executorEnv.SPARK_DRIVER_POD_IP=${SPARK_DRIVER_BIND_ADDRESS}" \
      --deploy-mode client \
      "$@"
    ;;
  executor)
    shift
    # JVM options arrive as SPARK_JAVA_OPT_0, SPARK_JAVA_OPT_1, ... in order.
    java_opts=()
    while IFS= read -r name; do
      java_opts+=("${!name}")
    done < <(compgen -e | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n || true)
    exec "${JAVA_HOME}/bin/java" \
      "${java_opts[@]}" \
      -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
      -cp "$(spark_classpath)" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL}" \
      --executor-id "${SPARK_EXECUTOR_ID}" \
      --cores "${SPARK_EXECUTOR_CORES}" \
      --app-id "${SPARK_APPLICATION_ID}" \
      --hostname "${SPARK_EXECUTOR_POD_IP}" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" \
      --podName "${SPARK_EXECUTOR_POD_NAME}"
    ;;
  *)
    exec "$@"
    ;;
esac
